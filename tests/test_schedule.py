"""Learning-rate schedules: phase boundaries, end points, and the LambdaLR they drive."""

import math

import pytest
import torch

from phonetune.train.schedule import cosine, linear, lr_multiplier, tri_stage

TOTAL = 1000
ARGS = dict(total_steps=TOTAL, warmup_ratio=0.1, hold_ratio=0.4, init_scale=0.01, final_scale=0.05)


@pytest.mark.parametrize("schedule", [tri_stage, linear, cosine])
def test_phases(schedule):
    values = [schedule(step, **ARGS) for step in range(TOTAL + 1)]
    assert values[0] == pytest.approx(0.01)
    assert values[50] == pytest.approx(0.01 + 0.99 * 0.5)  # linear warm-up
    assert all(a < b for a, b in zip(values[:100], values[1:100], strict=False))
    assert values[100] == 1.0 and values[499] == 1.0  # hold at the peak
    assert all(a >= b for a, b in zip(values[500:], values[501:], strict=False))  # then only down
    assert values[TOTAL] == pytest.approx(0.05)
    assert min(values) >= 0.01 - 1e-12


def test_decay_shapes_differ_as_documented():
    midpoint = 750  # halfway through the decay phase
    assert tri_stage(midpoint, **ARGS) == pytest.approx(
        math.sqrt(0.05)
    )  # exponential: geometric mean
    assert linear(midpoint, **ARGS) == pytest.approx((1 + 0.05) / 2)
    assert cosine(midpoint, **ARGS) == pytest.approx((1 + 0.05) / 2)
    assert cosine(625, **ARGS) > linear(625, **ARGS)  # cosine stays high longer, then falls faster
    assert cosine(875, **ARGS) < linear(875, **ARGS)


def test_no_warmup_and_no_decay_edge_cases():
    assert tri_stage(0, TOTAL, 0.0, 0.0, 0.01, 0.05) == 1.0
    assert linear(999, TOTAL, 0.1, 0.9, 0.01, 0.05) == 1.0  # all hold after warm-up
    assert cosine(5000, TOTAL, 0.1, 0.4, 0.01, 0.05) == pytest.approx(
        0.05
    )  # past the end: stays final


def test_lambda_lr_follows_the_schedule_and_restores_from_its_state():
    def make():
        parameter = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([parameter], lr=1e-3)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_multiplier("tri_stage", 100, 0.1, 0.4, 0.01, 0.05)
        )

    optimizer, scheduler = make()
    seen = []
    for _ in range(60):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(1e-5) and seen[10] == pytest.approx(1e-3)
    restored_optimizer, restored = make()
    restored_optimizer.load_state_dict(optimizer.state_dict())
    restored.load_state_dict(scheduler.state_dict())
    for _ in range(5):
        assert restored_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        for opt, sched in ((optimizer, scheduler), (restored_optimizer, restored)):
            opt.step()
            sched.step()
    assert optimizer.param_groups[0]["lr"] < 1e-3  # in the decay phase by now
