"""A reward run stopped after a checkpoint and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.config import load_config
from align.errors import UserError
from align.exports import write_kwise
from align.run import read_metrics
from align.synthetic import make_rankings
from reward.config import RewardConfig
from reward.train import RewardTrainer, train_reward_model
from tests.cli_in_process import run_align_in_process
from tests.resume_checks import assert_rows_kept, recording_steps
from tests.stopping import comparable, train_until


def write_rankings(path: Path, seed: int) -> Path:
    write_kwise(make_rankings(80, k=3, agreement=0.9, seed=seed), path)
    return path


def resumable(quick_config, out: Path, rankings: Path) -> RewardConfig:
    # 64 training rankings, 8 steps; a metrics row every 3 steps and at each checkpoint (every 4): rows at 3, 4, 6, 8
    return quick_config(f"output_dir={out}", "data.format=kwise", f"data.path={rankings}", "data.eval_fraction=0.2",
                        "train.batch_size=8", "train.save_every=4", "train.log_every=3", "train.keep_checkpoints=1",
                        "train.mismatch_coef=1.0", "eval.normalize=false")


def test_a_run_stopped_after_a_checkpoint_resumes_to_the_uninterrupted_model(quick_config, tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    rankings = write_rankings(tmp_path / "rankings.jsonl", seed=1)
    summary = train_reward_model(resumable(quick_config, straight, rankings), echo=lambda _: None)
    assert summary["train/steps"] == 8

    trainer = RewardTrainer(resumable(quick_config, stopped, rankings), echo=lambda _: None)
    trainer.setup()
    train_until(trainer, 7)  # steps 1-7 done, rows up to step 6 written, the last checkpoint at step 4
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-000004"]  # the older one removed
    assert [r["step"] for r in read_metrics(stopped / "metrics.jsonl")] == [3, 4, 6]

    # refused before anything is written: a setting that changes the training, edited into config.yaml;
    # the rankings file exported again with other rankings (the same number: the same steps)
    with pytest.raises(UserError, match="train.learning_rate is 0.5 where the run had 0.001; it would change"):
        train_reward_model(load_config(RewardConfig, stopped / "config.yaml", ["train.learning_rate=0.5"]),
                           echo=lambda _: None, resume=True)
    original = rankings.read_bytes()
    write_rankings(rankings, seed=2)
    with pytest.raises(UserError, match="the training data differ from those the run was trained on"):
        train_reward_model(load_config(RewardConfig, stopped / "config.yaml"), echo=lambda _: None, resume=True)
    rankings.write_bytes(original)
    before = read_metrics(stopped / "metrics.jsonl")
    assert [r["step"] for r in before] == [3, 4, 6]

    # settings that leave the training as it is may change: memory, evaluation batch. The resumed run trains
    # the steps after the checkpoint, once each, and writes the rows from step 6 on (a run that trained again
    # from step 0 ends with the same rows and, but for rounding, the same weights)
    # the training time and peak memory of steps 1-4 travel in the checkpoint: the summary is the whole run's
    # (made a day here, so that the resumed process's own time could never reach it)
    state_file = stopped / "checkpoints" / "step-000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["clock"]["seconds"] > 0 and state["clock"]["peak_rss_mb"] > 0
    state["clock"].update(seconds=86400.0, cpu_seconds=86400.0, peak_rss_mb=1e6)
    state_file.write_text(json.dumps(state))
    clock = state["clock"]
    taken: list[int] = []
    monkeypatch.setattr(RewardTrainer, "step", recording_steps(RewardTrainer.step, "step_count", taken.append))
    resumed = train_reward_model(load_config(RewardConfig, stopped / "config.yaml", [
        "train.gradient_accumulation_steps=2", "eval.batch_size=7"]), echo=lambda _: None, resume=True)
    assert taken == [5, 6, 7, 8]
    new = assert_rows_kept(before, read_metrics(stopped / "metrics.jsonl"), "step", 4)
    assert new[0]["step"] == 6
    # the rows' elapsed time is the run's, the day of steps 1-4 included; a step's time is its window's mean
    assert all(r["timing/elapsed_s"] > clock["seconds"] for r in new)
    assert all(0 < r["timing/step_s"] < r["timing/elapsed_s"] - clock["seconds"] for r in new)
    rows, expected = (comparable(read_metrics(run / "metrics.jsonl")) for run in (stopped, straight))
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [3, 4, 6, 8]  # step 6 written again, once
    for row, want in zip(rows, expected):
        assert row == pytest.approx(want, abs=1e-6), row["step"]
    weights, want = (load_file(str(run / "model" / "model.safetensors")) for run in (stopped, straight))  # full fine-tuning
    assert weights.keys() == want.keys() and weights
    for name, value in want.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-6, msg=name)
    for key in ("eval/accuracy", "eval/loss", "train/loss_final", "train/responses_forwarded"):
        assert resumed[key] == pytest.approx(summary[key], abs=1e-6), key
    assert resumed["timing/train_s"] > clock["seconds"] and resumed["timing/train_cpu_s"] > clock["cpu_seconds"]
    assert resumed["memory/peak_rss_mb"] == clock["peak_rss_mb"]
    assert resumed["timing/total_s"] > resumed["timing/train_s"]  # the parts add up


def test_resume_mistakes_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    result = run_align_in_process(capsys, "reward", "train", "--resume", str(run))  # its words and exit code
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {run}: not a reward run directory (no config.yaml)"


def test_rankings_without_preference_are_counted_in_one_line(quick_config, tmp_path):
    from align.formats import Ranking

    train, held_out = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    write_kwise([*make_rankings(16, k=3, seed=5, split="heldout"), Ranking("held-out tie?", ["x", "y"], [0, 0])],
                held_out)
    write_kwise([*make_rankings(16, k=3, seed=4), Ranking("just one?", ["only"], [0]),
                 Ranking("all the same?", ["a", "b", "c"], [1, 1, 1])], train)
    lines: list[str] = []
    RewardTrainer(quick_config(f"output_dir={tmp_path / 'run'}", "data.format=kwise", f"data.path={train}",
                               f"data.eval_path={held_out}"), echo=lines.append).setup()
    assert [line for line in lines if "left out" in line] == [
        "reward: left out 2 training and 1 held-out rankings that state no preference (a single response, or "
        "every response tied)"]
