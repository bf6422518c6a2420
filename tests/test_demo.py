"""`align demo` end to end on the random tiny model (small settings; the real run is in the README)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from align.commands.demo import run_demo, split_overrides
from align.config import ConfigError


def test_overrides_are_routed_to_their_stage():
    demo, reward, ppo, dpo = split_overrides(["k=3", "reward.train.learning_rate=0.1", "ppo.kl.coef=0.2", "dpo.beta=0.2"])
    assert (demo, reward, ppo, dpo) == (["k=3"], ["train.learning_rate=0.1"], ["kl.coef=0.2"], ["beta=0.2"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["num_promps=5"], "did you mean 'num_prompts'"),
        (["reward.train.learnin_rate=0.1"], "did you mean 'train.learning_rate'"),
        (["ppo.kl_coeff=0.1"], r"^ppo stage \(ppo.KEY=VALUE\): unknown config key 'kl_coeff' for PPOConfig"),
        (["annotators_per_prompt=5", "num_annotators=2"], "exceeds num_annotators"),
        (["method=reinforce"], "method"),
        (["method=dpo", "dpo.bta=0.1"], "did you mean 'beta'"),
        (["method=grpo", "ppo.samples_per_prompt=1"], "needs samples_per_prompt >= 2"),
        # a stage the method does not run: its overrides are checked all the same, then refused
        (["method=dpo", "ppo.bogus=1", "reward.bogus=2"], "^reward stage .*unknown config key 'bogus' for RewardConfig"),
        (["method=dpo", "ppo.bogus=1"], "unknown config key 'bogus' for PPOConfig"),
        (["dpo.beta=banana"], r"^dpo stage \(dpo.KEY=VALUE\): beta: expected a number, got 'banana'"),
        (["method=rloo", "dpo.beta=-1"], "beta: must be > 0"),
        (["method=dpo", "ppo.kl.coef=0.1"],
         r"^'ppo.kl.coef' is not used: ppo.\* overrides need method=ppo/rloo/grpo; this demo runs dpo$"),
        (["method=dpo", "reward.train.epochs=2"],
         r"^'reward.train.epochs' is not used: reward.\* overrides need method=ppo/rloo/grpo \(the roads with a "
         r"reward model\); this demo runs dpo$"),
        (["dpo.beta=0.2"], r"^'dpo.beta' is not used: dpo.\* overrides need method=dpo; this demo runs ppo$"),
        (["method=grpo", "dpo.beta=0.2"], r"dpo.\* overrides need method=dpo; this demo runs grpo$"),
    ],
)
def test_bad_overrides_stop_before_any_work(tmp_path, overrides, message):
    # with no SFT model a refusal that came after the first stage had started would be another error
    with pytest.raises(ConfigError, match=message):
        run_demo(tmp_path / "demo", config_path=None, overrides=[f"model={tmp_path / 'no-model'}", *overrides])
    assert not (tmp_path / "demo").exists()


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_its_report(tiny_random_model, tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, config_path=None, overrides=[
        f"model={tiny_random_model}", "num_prompts=24", "k=3", "num_annotators=2", "annotators_per_prompt=2",
        "num_eval_prompts=6", "max_new_tokens=10",
        "reward.eval.normalize_prompts=8", "reward.train.batch_size=8",
        "ppo.num_iterations=2", "ppo.batch_size=8", "ppo.num_mini_batches=2", "ppo.response_length=10",
        "ppo.num_eval_prompts=6", "ppo.save_every=0", "ppo.temperature=0.9",
    ])
    # Every prompt was ranked by both simulated annotators, through the web app's services.
    rankings = [json.loads(line) for line in (out / "rankings.kwise.jsonl").read_text().splitlines()]
    assert len(rankings) == 48
    assert {r["annotator"] for r in rankings} == {"simulated-0", "simulated-1"}
    assert all(len(r["responses"]) == 3 and len(r["ranks"]) == 3 for r in rankings)
    # Each stage left its run directory; the demo's summary carries the PPO eval keys.
    assert (out / "reward" / "model" / "reward_normalization.json").exists()
    assert (out / "ppo" / "policy" / "adapter_config.json").exists()
    assert (out / "export" / "model.safetensors").exists() and (out / "export" / "README.md").exists()
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("eval/reward_sft", "eval/reward_policy", "eval/gold_sft", "eval/gold_policy", "eval/gold_sft_std",
                "eval/kl", "demo/gold_export", "demo/gold_sft"):
        assert key in on_disk and on_disk[key] == pytest.approx(summary[key])
    # SFT and exported model are compared on samples drawn like PPO's own evaluation samples
    assert on_disk["demo/temperature"] == 0.9
    report = (out / "report.md").read_text()
    # the PPO run's own curves are linked, not redrawn; the gold plot shows the table's comparison
    for png in ("ppo/reward.png", "ppo/kl.png", "gold_scores.png"):
        assert f"]({png})" in report
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"| gold judge score | {on_disk['demo/gold_sft']:.3f} | {on_disk['demo/gold_export']:.3f} |" in report


@pytest.mark.slow
def test_demo_takes_the_dpo_road_without_a_reward_model(tiny_random_model, tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(out, config_path=None, overrides=[
        f"model={tiny_random_model}", "method=dpo", "num_prompts=24", "k=3", "num_eval_prompts=6",
        "max_new_tokens=10", "dpo.batch_size=8", "dpo.num_eval_prompts=6", "dpo.response_length=10",
        "dpo.data.eval_fraction=0.25",
    ])
    assert not (out / "reward").exists() and (out / "dpo" / "policy" / "adapter_config.json").exists()
    assert (out / "export" / "model.safetensors").exists() and "DPO settings" in (out / "export" / "README.md").read_text()
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["demo/method"] == "dpo" and "demo/reward_sft" not in on_disk
    assert on_disk["eval/num_pairs"] > 0 and on_disk["demo/gold_export"] == pytest.approx(summary["demo/gold_export"])
    report = (out / "report.md").read_text()
    assert "reward-model score" not in report and "implicit reward" in report


def test_continue_without_a_database_is_a_user_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "align", "demo", "--continue", "--out", str(tmp_path / "d")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "nothing to continue" in result.stderr and "Traceback" not in result.stderr
