"""The optimizer, and learning-rate schedules as plain functions of the step.

`make_optimizer` builds AdamW over the trainable parameters; `make_scheduler` the LambdaLR of the
configured schedule.

Each returns the multiplier of the peak learning rate for optimizer step `step` (0-based) of a run of
`total_steps`. All three share fairseq's phase layout: a linear warm-up from `init_scale` to 1, a hold
at 1, then a decay to `final_scale` at the last step. They differ only in the shape of the decay:
- `tri_stage`: exponential, as fairseq's `tri_stage` scheduler (wav2vec 2.0 fine-tuning);
- `linear`: straight line;
- `cosine`: half a cosine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from phonetune.train.config import Config


def _multiplier(
    step: int,
    total_steps: int,
    warmup_ratio: float,
    hold_ratio: float,
    init_scale: float,
    decay: Callable[[float], float],
) -> float:
    """Warm-up from `init_scale` to 1, hold at 1, then `decay(progress)` with progress 0 -> 1."""
    warmup = int(total_steps * warmup_ratio)
    hold = int(total_steps * hold_ratio)
    decay_steps = max(total_steps - warmup - hold, 0)
    if step < warmup:
        return init_scale + (1.0 - init_scale) * step / warmup
    if step < warmup + hold or decay_steps == 0:
        return 1.0
    return decay(min((step - warmup - hold) / decay_steps, 1.0))


def tri_stage(
    step: int,
    total_steps: int,
    warmup_ratio: float,
    hold_ratio: float,
    init_scale: float,
    final_scale: float,
) -> float:
    """fairseq's tri-stage schedule: linear warm-up, hold, then exponential decay to `final_scale`."""
    return _multiplier(
        step, total_steps, warmup_ratio, hold_ratio, init_scale,
        lambda progress: math.exp(math.log(final_scale) * progress),
    )  # fmt: skip


def linear(
    step: int,
    total_steps: int,
    warmup_ratio: float,
    hold_ratio: float,
    init_scale: float,
    final_scale: float,
) -> float:
    """Linear warm-up, hold, then linear decay to `final_scale`."""
    return _multiplier(
        step, total_steps, warmup_ratio, hold_ratio, init_scale,
        lambda progress: 1.0 + (final_scale - 1.0) * progress,
    )  # fmt: skip


def cosine(
    step: int,
    total_steps: int,
    warmup_ratio: float,
    hold_ratio: float,
    init_scale: float,
    final_scale: float,
) -> float:
    """Linear warm-up, hold, then half a cosine down to `final_scale`."""
    return _multiplier(
        step, total_steps, warmup_ratio, hold_ratio, init_scale,
        lambda progress: final_scale + (1.0 - final_scale) * 0.5 * (1.0 + math.cos(math.pi * progress)),
    )  # fmt: skip


SCHEDULES: dict[str, Callable[..., float]] = {
    "tri_stage": tri_stage,
    "linear": linear,
    "cosine": cosine,
}


def lr_multiplier(
    name: str,
    total_steps: int,
    warmup_ratio: float,
    hold_ratio: float,
    init_scale: float,
    final_scale: float,
) -> Callable[[int], float]:
    """step -> multiplier for `torch.optim.lr_scheduler.LambdaLR` (which saves only its step count)."""
    schedule = SCHEDULES[name]

    def multiplier(step: int) -> float:
        return schedule(step, total_steps, warmup_ratio, hold_ratio, init_scale, final_scale)

    return multiplier


def make_optimizer(module: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norms."""
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "norm" in name else decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=config.train.lr,
        betas=tuple(config.train.betas),
        eps=config.train.eps,
        # One kernel for the whole update instead of a dozen per tensor (CPU and CUDA): on the tiny
        # CPU recipe this alone is ~8% of a step (BENCHMARKS.md, training section).
        fused=True,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: Config
) -> torch.optim.lr_scheduler.LambdaLR:
    t = config.train
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_multiplier(
            t.lr_schedule,
            t.max_steps,
            t.warmup_ratio,
            t.hold_ratio,
            t.init_lr_scale,
            t.final_lr_scale,
        ),
    )
