"""Fixtures for the reward tests: a tiny random Llama checkpoint and quick configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from align.config import load_config
from reward.config import RewardConfig

REPO = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    return Path(os.environ.get("ALIGN_SHARED_DATA", REPO / "../shared/data")).resolve()


@pytest.fixture(scope="session")
def rm_base(tmp_path_factory) -> Path:
    """A random-init tiny Llama + demo tokenizer (seconds); the lead's `tiny_random_model` when present."""
    from align.demo_model import build_random_model

    return build_random_model(tmp_path_factory.mktemp("rm-base") / "model", seed=0)


@pytest.fixture
def quick_config(rm_base, tmp_path):
    """A RewardConfig for a seconds-long run on the synthetic task; extra overrides as arguments."""

    def make(*overrides: str) -> RewardConfig:
        base = [
            f"model.name_or_path={rm_base}",
            f"output_dir={tmp_path / 'run'}",
            "model.max_length=160",
            "data.num_rankings=64",
            "data.num_eval_rankings=24",
            "train.batch_size=16",
            "eval.normalize_prompts=8",
            "eval.normalize_max_new_tokens=16",
            "train.log_every=1",
        ]
        return load_config(RewardConfig, None, base + list(overrides))

    return make
