"""Fixtures for the PPO tests: a tiny random policy, a real (random-head) reward model on it,
and the overrides of a PPO run small enough to finish in seconds on a laptop CPU."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def ppo_policy_path(tiny_random_model) -> Path:
    """The suite's tiny random policy (tests/conftest.py)."""
    return tiny_random_model


@pytest.fixture
def small_run(ppo_policy_path, random_reward_model, tmp_path) -> list[str]:
    """key=value overrides for a PPO run of a few seconds."""
    return [
        f"policy_model={ppo_policy_path}",
        f"reward_model={random_reward_model}",
        f"output_dir={tmp_path / 'run'}",
        "num_prompts=64",
        "num_eval_prompts=8",
        "num_iterations=3",
        "batch_size=8",
        "num_mini_batches=2",
        "gradient_accumulation_steps=2",
        "num_ppo_epochs=2",
        "response_length=8",
        "learning_rate=1e-3",
        "save_every=0",
        "progress=false",
        "seed=3",
    ]
