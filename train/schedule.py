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


def _phase_lengths(
    total_steps: int, warmup_ratio: float, hold_ratio: float
) -> tuple[int, int, int]:
    warmup = int(total_steps * warmup_ratio)
    hold = int(total_steps * hold_ratio)
    return warmup, hold, max(total_steps - warmup - hold, 0)


def _warmup_or_hold(step: int, warmup: int, hold: int, init_scale: float) -> float | None:
    """The multiplier during warm-up or hold, or None once decay has begun."""
    if step < warmup:
        return init_scale + (1.0 - init_scale) * step / warmup
    if step < warmup + hold:
        return 1.0
    return None


def tri_stage(
    step: int,
    total_steps: int,
    warmup_ratio: float,
    hold_ratio: float,
    init_scale: float,
    final_scale: float,
) -> float:
    """fairseq's tri-stage schedule: linear warm-up, hold, then exponential decay to `final_scale`."""
    warmup, hold, decay = _phase_lengths(total_steps, warmup_ratio, hold_ratio)
    early = _warmup_or_hold(step, warmup, hold, init_scale)
    if early is not None:
        return early
    if decay == 0:
        return 1.0
    progress = min((step - warmup - hold) / decay, 1.0)
    return math.exp(math.log(final_scale) * progress)


def linear(
    step: int,
    total_steps: int,
    warmup_ratio: float,
    hold_ratio: float,
    init_scale: float,
    final_scale: float,
) -> float:
    """Linear warm-up, hold, then linear decay to `final_scale`."""
    warmup, hold, decay = _phase_lengths(total_steps, warmup_ratio, hold_ratio)
    early = _warmup_or_hold(step, warmup, hold, init_scale)
    if early is not None:
        return early
    if decay == 0:
        return 1.0
    progress = min((step - warmup - hold) / decay, 1.0)
    return 1.0 + (final_scale - 1.0) * progress


def cosine(
    step: int,
    total_steps: int,
    warmup_ratio: float,
    hold_ratio: float,
    init_scale: float,
    final_scale: float,
) -> float:
    """Linear warm-up, hold, then half a cosine down to `final_scale`."""
    warmup, hold, decay = _phase_lengths(total_steps, warmup_ratio, hold_ratio)
    early = _warmup_or_hold(step, warmup, hold, init_scale)
    if early is not None:
        return early
    if decay == 0:
        return 1.0
    progress = min((step - warmup - hold) / decay, 1.0)
    return final_scale + (1.0 - final_scale) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
