"""Fixtures for the DPO tests: overrides of a DPO run small enough to finish in seconds."""

from __future__ import annotations

import pytest


@pytest.fixture
def small_dpo_run(tiny_random_model, tmp_path) -> list[str]:
    """key=value overrides for a DPO run of a few seconds on synthetic rankings."""
    return [
        f"policy_model={tiny_random_model}",
        f"output_dir={tmp_path / 'run'}",
        "data.num_rankings=48",
        "data.num_eval_rankings=16",
        "data.k=3",
        "batch_size=8",
        "epochs=1",
        "learning_rate=5e-3",
        "num_eval_prompts=8",
        "response_length=8",
        "progress=false",
        "seed=1",
    ]
