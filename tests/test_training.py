"""align.training: the metrics rows of the offline stages' step loop."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from align.training import StepLoop


class _Rows:
    """The run's metrics rows (align.tracking.RunLog): each row logged, with its step."""

    def __init__(self):
        self.logged = []

    def log(self, row, step):
        self.logged.append((step, row))


class _Loop(StepLoop):
    """The step loop alone, in one process: step n reports train/loss = n."""

    stage = "test"

    def __init__(self, steps: int, log_every: int, save_every: int):
        self.loop_cfg = SimpleNamespace(log_every=log_every, save_every=save_every, progress=False)
        self.global_batches = [[n] for n in range(1, steps + 1)]
        self.accelerator = SimpleNamespace(reduce=lambda t, _op: t)  # one process: the mean over ranks is its own
        self.device, self.is_main, self.lr = torch.device("cpu"), True, 0.1
        self.run_log = _Rows()
        self.saved_at = []

    def local_batches(self, global_batch):
        return global_batch

    def step(self, local):
        return {"train/loss": float(local[0])}

    def save_checkpoint(self):
        self.saved_at.append(self.step_count)


@pytest.mark.parametrize(("log_every", "save_every", "expected"), [
    (3, 0, {3: (1 + 2 + 3) / 3, 5: (4 + 5) / 2}),  # the last row: the 2 steps since the last one
    (3, 2, {2: 1.5, 3: 3.0, 4: 4.0, 5: 5.0}),  # a checkpoint closes the window early
])
def test_each_metrics_row_is_the_mean_of_the_steps_since_the_last_row(log_every, save_every, expected):
    loop = _Loop(steps=5, log_every=log_every, save_every=save_every)
    loop.train()
    assert {row["step"]: row["train/loss"] for _, row in loop.run_log.logged} == pytest.approx(expected)
    assert all(step == row["step"] for step, row in loop.run_log.logged)  # each row at its step
    assert loop.saved_at == ([2, 4] if save_every else [])
