"""Fixtures for the reward tests (the models come from tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

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


@pytest.fixture(scope="module")
def rankings_file(tmp_path_factory) -> Path:
    """10 synthetic rankings of 3 responses (the reward models to import are measured on them)."""
    from align.exports import write_kwise
    from align.synthetic import make_rankings

    path = tmp_path_factory.mktemp("rankings") / "rankings.jsonl"
    write_kwise(make_rankings(10, k=3, seed=1), path)
    return path
