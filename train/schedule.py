"""Learning-rate schedules as plain functions of the step.

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
