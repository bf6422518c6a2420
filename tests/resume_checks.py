"""What tells a resumed run from a rerun from scratch, for the resume tests of every stage.

A deterministic run that silently starts again from step 0 ends with the same rows, weights and
summary as a resumed one; what differs is the work the resumed process does and the rows it leaves
alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


def recording_steps(step: Callable[..., Any], counter: str, record: Callable[[int], Any]) -> Callable[..., Any]:
    """A trainer class's `step` (one optimizer step, one PPO iteration) that first records the number
    of the step it performs: its trainer's `counter` (steps done) + 1."""

    @functools.wraps(step)
    def recorded(trainer: Any, *args: Any) -> Any:
        record(getattr(trainer, counter) + 1)
        return step(trainer, *args)

    return recorded


def assert_rows_kept(before: list[dict], after: list[dict], key: str, checkpoint: int) -> list[dict]:
    """The metrics rows the stopped run wrote up to its checkpoint (`key` <= `checkpoint`) are those of
    the resumed run's file, as they were: their timings are the stopped run's, which a run that wrote
    them again would not repeat. Returns the rows after them, all written for steps after the checkpoint."""
    kept = [row for row in before if row[key] <= checkpoint]
    assert after[: len(kept)] == kept, "the rows up to the checkpoint were written again"
    new = after[len(kept):]
    assert new and all(row[key] > checkpoint for row in new)
    return new
