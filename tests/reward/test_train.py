"""End-to-end runs on the synthetic task with a tiny random model (seconds each)."""

import dataclasses
import json
from pathlib import Path

import pytest

from align.exports import write_kwise
from align.formats import Ranking
from align.run import read_metrics
from align.synthetic import make_rankings
from reward.data import load_reward_data
from reward.evaluate import evaluate_rankings
from reward.model import build_reward_model
from reward.train import train_reward_model
from tests.cli_in_process import run_align_in_process


def test_training_raises_heldout_accuracy_above_chance(quick_config):
    from align.modeling import load_tokenizer

    cfg = quick_config("data.num_rankings=192", "data.num_eval_rankings=60", "train.learning_rate=3e-3")
    tok = load_tokenizer(cfg.model.name_or_path)
    untrained = build_reward_model(cfg.model.name_or_path, tok, seed=cfg.train.seed)
    before = evaluate_rankings(untrained, tok, load_reward_data(cfg.data).eval, max_length=cfg.model.max_length,
                               batch_size=64)["eval/accuracy"]
    summary = train_reward_model(cfg, echo=lambda s: None)
    assert summary["eval/label_source"] == "gold"
    assert summary["eval/accuracy"] > 0.57
    assert summary["eval/accuracy"] > before + 0.05
    # the run directory holds what the contract promises
    run = Path(cfg.output_dir)
    assert json.loads((run / "summary.json").read_text())["eval/accuracy"] == summary["eval/accuracy"]
    assert summary["eval/num_pairs"] > 0 and summary["eval/accuracy_k4"] == summary["eval/accuracy"]
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, summary["train/steps"] + 1))
    assert metrics[-1]["train/loss"] < metrics[0]["train/loss"] + 0.05
    assert (run / "config.yaml").exists() and (run / "model" / "reward_normalization.json").exists()
    # each response forwarded once: K = 4 per ranking
    assert summary["train/responses_forwarded"] == 4 * summary["train/rankings"]


def test_kwise_file_with_mixed_k_and_several_annotators(tmp_path, quick_config):
    rankings = []
    for k, seed in ((2, 1), (3, 2), (4, 3)):
        rankings += make_rankings(60, k=k, agreement=0.8, seed=seed, annotators=3)
    path = tmp_path / "rankings.jsonl"
    write_kwise(rankings, path)
    summary = train_reward_model(quick_config("data.format=kwise", f"data.path={path}", "data.eval_fraction=0.3"),
                                 echo=lambda s: None)
    assert summary["eval/label_source"] == "annotators"
    assert {"eval/accuracy_k2", "eval/accuracy_k3", "eval/accuracy_k4"} <= set(summary)
    assert summary["eval/num_pairs"] == sum(summary[f"eval/num_pairs_k{k}"] for k in (2, 3, 4))
    # three annotators per prompt: their agreement is the ceiling to compare the model with
    assert 0.5 < summary["eval/annotator_agreement"] < 1.0
    assert 0.0 <= summary["eval/cross_annotator_accuracy"] <= 1.0
    assert summary["eval/cross_annotator_num_pairs"] > 0


def test_mismatch_pairs_add_one_forward_per_ranking_and_their_loss(quick_config, tmp_path):
    def first_step(coef: float, out: str) -> tuple[dict, dict]:
        cfg = quick_config(f"output_dir={tmp_path / out}", f"train.mismatch_coef={coef}", "train.log_every=1",
                           "model.max_length=512")  # nothing truncated: every ranking gets its mismatched pair
        summary = train_reward_model(cfg, echo=lambda s: None)
        return summary, read_metrics(Path(cfg.output_dir) / "metrics.jsonl")[0]

    plain_summary, plain = first_step(0.0, "plain")
    summary, with_mismatch = first_step(2.0, "mismatch")
    assert plain_summary["train/responses_forwarded"] == 4 * plain_summary["train/rankings"]
    assert summary["train/responses_forwarded"] == 5 * summary["train/rankings"]  # one extra per ranking
    # step 1 sees the same weights and rankings: the loss grows by exactly coef * the mismatch term,
    # which starts near log 2 (a random head cannot tell the prompts apart)
    assert 0.5 < with_mismatch["train/mismatch_loss"] < 1.0
    assert abs(with_mismatch["train/loss"] - plain["train/loss"] - 2.0 * with_mismatch["train/mismatch_loss"]) < 1e-4
    # train/ranking_loss is the InstructGPT term alone (what eval/loss measures on held-out rankings)
    assert plain["train/ranking_loss"] == pytest.approx(plain["train/loss"], abs=1e-6)
    assert with_mismatch["train/ranking_loss"] == pytest.approx(plain["train/loss"], abs=1e-4)


def test_a_step_logs_the_loss_terms_and_statistics_of_its_own_rewards(quick_config, monkeypatch):
    """Step 1's metrics recomputed from the rewards its forward gave: the centering and mismatch
    terms in the loss, each with its sign (a top response scores higher under its own prompt than
    under another's), the winners' margin over the losers, and the rewards' mean and spread over
    the rankings' own responses, not their mismatched copies."""
    import torch

    import reward.train as train_module
    from reward.losses import kwise_ranking_loss, pairwise_loss, reward_centering_loss

    seen = []
    forward = train_module.forward_rewards_shared_prompts

    def recording(model, batch, buckets):
        rewards = forward(model, batch, buckets)
        if torch.is_grad_enabled():  # training, not evaluation
            seen.append((batch, rewards.detach().float()))
        return rewards

    monkeypatch.setattr(train_module, "forward_rewards_shared_prompts", recording)
    cfg = quick_config("train.max_steps=1", "train.center_coef=0.1", "train.mismatch_coef=2.0",
                       "model.max_length=512", "eval.normalize=false")
    train_reward_model(cfg, echo=lambda s: None)
    step = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")[0]
    (batch, r), = seen  # one micro-batch of 16 rankings
    w, lo = batch.winners, batch.losers
    ranking = kwise_ranking_loss(r, w, lo, batch.pair_group, batch.num_groups, 0.0).item()
    center = reward_centering_loss(r, w, lo, batch.pair_group, batch.num_groups, 0.1).item()
    mismatch = pairwise_loss(r[batch.mismatch_winners], r[batch.mismatch_losers]).mean().item()
    reversed_mismatch = pairwise_loss(r[batch.mismatch_losers], r[batch.mismatch_winners]).mean().item()
    own = r[:batch.num_ranked]
    assert center > 1e-3 and abs(mismatch - reversed_mismatch) > 1e-3 and abs((r[w] - r[lo]).mean()) > 1e-3
    assert abs(own.mean() - r.mean()) > 1e-4  # the mismatched copies would move the mean
    assert step["train/ranking_loss"] == pytest.approx(ranking, rel=1e-4)
    assert step["train/mismatch_loss"] == pytest.approx(mismatch, rel=1e-4)
    assert step["train/loss"] == pytest.approx(ranking + center + 2.0 * mismatch, rel=1e-4)
    assert step["train/reward_margin"] == pytest.approx((r[w] - r[lo]).mean().item(), rel=1e-4, abs=1e-6)
    assert step["train/reward_mean"] == pytest.approx(own.mean().item(), rel=1e-4, abs=1e-6)
    assert step["train/reward_std"] == pytest.approx(own.std().item(), rel=1e-4)


def test_pairwise_mode_forwards_each_response_k_minus_1_times(quick_config):
    summary = train_reward_model(quick_config("train.loss=pairwise", "data.num_rankings=32", "train.batch_size=48"),
                                 echo=lambda s: None)
    assert summary["train/examples"] == 6 * 32  # C(4, 2) pairs per ranking
    assert summary["train/responses_forwarded"] == 3 * 4 * 32


def test_score_cli_writes_rewards(quick_config, tmp_path, capsys):
    cfg = quick_config("data.num_rankings=32")
    train_reward_model(cfg, echo=lambda s: None)
    rows = [{"prompt": "How do I water a cactus?", "response": "Water it rarely.", "id": 1},
            {"prompt": [{"role": "user", "content": "Hi"}], "response": "Hello! How can I help?", "id": 2}]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_align_in_process(capsys, "reward", "score", "--model", cfg.output_dir, "--input", str(inp),
                                  "--out", str(out))
    assert result.returncode == 0, result.stderr
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["id"] for s in scored] == [1, 2]
    from reward.model import load_reward_model

    rm = load_reward_model(cfg.output_dir)
    expected = rm.score([r["prompt"] for r in rows], [r["response"] for r in rows]).tolist()
    assert all(abs(s["reward"] - e) < 1e-5 for s, e in zip(scored, expected))
    assert all(abs(s["reward"] - (rm.gain * s["reward_raw"] + rm.bias)) < 1e-6 for s in scored)
    # a bad input line is one clear error
    inp.write_text('{"prompt": "x"}\n')
    bad = run_align_in_process(capsys, "reward", "score", "--model", cfg.output_dir, "--input", str(inp))
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {inp}:1: each line needs `prompt` and a string `response`"


def test_eval_cli_prints_accuracy_table(quick_config, tmp_path, capsys):
    cfg = quick_config("data.num_rankings=32")
    train_reward_model(cfg, echo=lambda s: None)
    # held-out rankings ordered by the trained model's own scores (accuracy 1), or the reverse (accuracy 0)
    from reward.model import load_reward_model

    rm = load_reward_model(cfg.output_dir, device="cpu")
    rankings = make_rankings(12, k=3, seed=4, split="heldout")
    for reverse, expected in ((False, 1.0), (True, 0.0)):
        ordered = []
        for r in rankings:
            scores = rm.score([r.prompt] * len(r.responses), r.responses).tolist()
            assert len(set(scores)) == len(scores)  # no tie to score as a half
            by_score = sorted(range(len(scores)), key=lambda i: scores[i], reverse=not reverse)
            ordered.append(Ranking(prompt=r.prompt, responses=r.responses, ranks=[by_score.index(i) for i in range(3)]))
        path = tmp_path / "heldout.jsonl"
        write_kwise(ordered, path)
        result = run_align_in_process(capsys, "reward", "eval", "--model", cfg.output_dir, "--data", str(path))
        assert result.returncode == 0, result.stderr
        table = dict(line.split() for line in result.stdout.splitlines())  # (no note: all held out)
        assert float(table["eval/accuracy"]) == expected and float(table["eval/accuracy_k3"]) == expected
        assert int(table["eval/num_rankings"]) == 12 and int(table["eval/num_pairs"]) == 36

    # rankings of prompts the model was trained on: the accuracy is said not to be a held-out one
    from reward.data import load_reward_data

    trained = load_reward_data(cfg.data).train[:5]
    write_kwise([*trained, *rankings[:7]], tmp_path / "mixed.jsonl")
    result = run_align_in_process(capsys, "reward", "eval", "--model", cfg.output_dir, "--data",
                                  str(tmp_path / "mixed.jsonl"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == ("note: 5 of the 12 rankings are of prompts the model was trained on, so "
                                              "this accuracy is not a held-out one (the run's own is in its summary.json)")


def test_the_logged_learning_rate_is_the_one_each_step_took(quick_config, tmp_path):
    # no warm-up, linear decay to 0 over 4 steps: the steps take lr * 1, 3/4, 2/4, 1/4 (the rate after
    # a step is the next step's)
    cfg = quick_config(f"output_dir={tmp_path / 'lr'}", "train.warmup_ratio=0.0", "train.max_steps=4",
                       "train.learning_rate=1e-3")
    train_reward_model(cfg, echo=lambda s: None)
    rows = read_metrics(Path(cfg.output_dir) / "metrics.jsonl")
    assert [r["train/lr"] for r in rows] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


def test_rankings_of_one_prompt_are_refused_before_training_when_normalised(tmp_path, quick_config):
    """The normalisation scales the spread of the SFT model's answers: one prompt's answer has none
    (its std is NaN), so the run stops before it trains rather than saving an unscaled model."""
    from align.errors import UserError

    rankings = make_rankings(40, k=3, agreement=0.8, seed=5)
    same = [dataclasses.replace(r, prompt=rankings[0].prompt) for r in rankings]
    write_kwise(same, tmp_path / "one_prompt.jsonl")
    write_kwise([r for r in rankings[20:] if r.prompt != rankings[0].prompt], tmp_path / "held_out.jsonl")
    data = ["data.format=kwise", f"data.path={tmp_path / 'one_prompt.jsonl'}",
            f"data.eval_path={tmp_path / 'held_out.jsonl'}"]
    with pytest.raises(UserError, match="hold 1 distinct prompt: the normalisation"):
        train_reward_model(quick_config(*data), echo=lambda s: None)
    assert not (tmp_path / "run" / "reward_head.pt").exists() and not list((tmp_path / "run").glob("checkpoints/*"))
    summary = train_reward_model(quick_config(*data, "eval.normalize=false", "overwrite=true", "train.max_steps=1"),
                                 echo=lambda s: None)
    assert summary["reward/gain"] == 1.0

