"""align.schedule: the learning-rate schedule of every stage, on a few steps worked out by hand."""

from __future__ import annotations

import pytest
import torch

from align.schedule import lr_factor, lr_schedule


def test_the_scheduler_runs_each_optimiser_step_at_its_factor_of_the_peak():
    """10 steps, 2 of warm-up at 1/2 and 2/2 of the peak (the first step already learns), then
    (10 - s) / 8 of it, down to 1/8 at the last step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = lr_schedule(optimizer, total_steps=10, warmup_steps=2)
    rates = []
    for _ in range(10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2 * f for f in [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]])


@pytest.mark.parametrize(("shape", "floor", "expected"), [
    ("linear", 0.0, [1.0, 1.0, 0.75, 0.5, 0.25]),
    # 0.5 * (1 + cos(pi * p)) at p = 0, 1/4, 2/4, 3/4 of the 4 steps after the warm-up
    ("cosine", 0.0, [1.0, 1.0, 0.8535534, 0.5, 0.1464466]),
    ("cosine", 0.1, [1.0, 1.0, 0.1 + 0.9 * 0.8535534, 0.1 + 0.9 * 0.5, 0.1 + 0.9 * 0.1464466]),
    ("constant", 0.0, [1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_after_one_warm_up_step_each_shape_decays_as_its_formula(shape, floor, expected):
    assert [lr_factor(s, 5, 1, shape, floor) for s in range(5)] == pytest.approx(expected)


def test_without_warm_up_the_first_step_is_at_the_peak():
    assert [lr_factor(s, 4, 0) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert [lr_factor(s, 4, 4, "constant") for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize(("shape", "floor"), [("linear", 0.0), ("cosine", 0.0), ("cosine", 0.1)])
def test_steps_past_the_end_stay_at_the_floor(shape, floor):
    # an optimiser step past total_steps (a run resumed for more steps than it planned) does not climb
    # back up the cosine or go below the floor
    assert [lr_factor(s, 5, 1, shape, floor) for s in (5, 6, 8, 9)] == pytest.approx([floor] * 4)
