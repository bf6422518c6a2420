"""Stopping a training stage the way a kill would, for the resume tests of every stage."""

from __future__ import annotations

from typing import Any

import pytest


class Stopped(Exception):
    """Stands for the kill: raised inside a training step, after the rows before it were written."""


def train_until(trainer: Any, steps: int) -> None:
    """Train a set-up trainer (reward, DPO) and stop it at the start of step `steps + 1`: the
    metrics rows and checkpoints of the steps before are on disk, nothing after."""
    real_step = trainer.step

    def step_then_stop(*args: Any) -> Any:
        if trainer.step_count == steps:
            raise Stopped
        return real_step(*args)

    trainer.step = step_then_stop
    with pytest.raises(Stopped):
        trainer.train()
    trainer.run_log.close(failed=True)  # as the stage does on an error


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics rows without their timings, which differ between any two runs."""
    return [{k: v for k, v in r.items() if not k.startswith("timing/")} for r in rows]
