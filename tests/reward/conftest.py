"""Fixtures for the reward tests (the models come from tests/conftest.py)."""

from __future__ import annotations

import pytest

from align.config import load_config
from reward.config import RewardConfig


@pytest.fixture
def quick_config(tiny_random_model, tmp_path):
    """A RewardConfig for a seconds-long run on the synthetic task; extra overrides as arguments."""

    def make(*overrides: str) -> RewardConfig:
        base = [
            f"model.name_or_path={tiny_random_model}",
            f"output_dir={tmp_path / 'run'}",
            "model.max_length=160",
            "data.num_rankings=64",
            "data.num_eval_rankings=24",
            "train.batch_size=16",
            "eval.normalize_prompts=8",
            "eval.normalize_response_length=16",
            "train.log_every=1",
            "train.num_threads=1",
        ]
        return load_config(RewardConfig, None, base + list(overrides))

    return make
