"""A DPO run stopped after a checkpoint and resumed ends where an uninterrupted run ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from align.config import load_config
from align.errors import UserError
from align.run import read_metrics
from dpo.config import DPOConfig
from dpo.train import DPOTrainer, run_dpo
from tests.cli_in_process import run_align_in_process
from tests.resume_checks import assert_rows_kept, recording_steps
from tests.stopping import comparable, train_until


def overrides(small_dpo_run: list[str], out: Path) -> list[str]:
    # a metrics row every 3 steps and at each checkpoint (every 4): rows at 3, 4, 6, 8, 9, 12
    return [*small_dpo_run, f"output_dir={out}", "epochs=2", "save_every=4", "log_every=3", "keep_checkpoints=1"]


def test_a_run_stopped_after_a_checkpoint_resumes_to_the_uninterrupted_result(small_dpo_run, tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    summary = run_dpo(load_config(DPOConfig, None, overrides(small_dpo_run, straight)), echo=lambda _: None)
    steps = summary["train/steps"]
    assert steps >= 9

    trainer = DPOTrainer(load_config(DPOConfig, None, overrides(small_dpo_run, stopped)), echo=lambda _: None)
    trainer.setup()
    train_until(trainer, 7)  # steps 1-7 done, rows up to step 6 written, the last checkpoint at step 4
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-000004"]  # the older one removed
    assert [r["step"] for r in read_metrics(stopped / "metrics.jsonl")] == [3, 4, 6]
    assert not (stopped / "policy").exists()

    # a damaged checkpoint, or one whose run had another adapter rank, is one line, and nothing is written
    weights = stopped / "checkpoints" / "step-000004" / "trainable.safetensors"
    kept = weights.read_bytes()
    weights.write_bytes(kept[: len(kept) // 2])
    with pytest.raises(UserError, match=r"step-000004 is incomplete or damaged \(SafetensorError"):
        run_dpo(load_config(DPOConfig, stopped / "config.yaml"), echo=lambda _: None, resume=True)
    # a weights file that lost a trained tensor (rewritten without it): the run would go on from a fresh one
    import re

    from safetensors.torch import save_file

    weights.write_bytes(kept)
    tensors = load_file(str(weights))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(weights))
    with pytest.raises(UserError, match=rf"step-000004 is incomplete or damaged \(ValueError: trainable.safetensors holds no "
                                        rf"'{re.escape(dropped)}' \(1 trained tensors missing\)"):
        run_dpo(load_config(DPOConfig, stopped / "config.yaml"), echo=lambda _: None, resume=True)
    weights.write_bytes(kept)
    with pytest.raises(UserError, match="lora.r is 4 where the run had 16"):
        run_dpo(load_config(DPOConfig, stopped / "config.yaml", ["lora.r=4"]), echo=lambda _: None, resume=True)
    # a checkpoint of two processes is refused before the policy loads (minutes for a large model)
    state_file = stopped / "checkpoints" / "step-000004" / "trainer_state.json"
    state = state_file.read_text()
    state_file.write_text(json.dumps({**json.loads(state), "world_size": 2}))
    with monkeypatch.context() as patched:
        patched.setattr("align.modeling.load_causal_lm", lambda *a, **k: pytest.fail("the policy loaded"))
        with pytest.raises(UserError, match=r"step-000004 was written by 2 processes; resume it with the same number"):
            run_dpo(load_config(DPOConfig, stopped / "config.yaml"), echo=lambda _: None, resume=True)
    state_file.write_text(state)
    before = read_metrics(stopped / "metrics.jsonl")
    assert [r["step"] for r in before] == [3, 4, 6]

    # the resumed run trains the steps after the checkpoint, once each, and writes the rows from step 6 on
    # (a run that trained again from step 0 ends with the same rows and weights)
    # (with a setting a resume may change, which config.yaml then records, and the hidden temporary of a
    # save cut short, which goes)
    leftover = stopped / "checkpoints" / ".step-000006.tmp-cut"
    leftover.mkdir()
    (leftover / "trainable.safetensors").write_bytes(b"partial")
    # (and written when data.annotators_per_prompt was data.annotators: the run resumes on the former name)
    for written in (stopped / "config.yaml", stopped / "checkpoints" / "step-000004" / "trainer_state.json"):
        written.write_text(written.read_text().replace("annotators_per_prompt", "annotators"))
    taken: list[int] = []
    monkeypatch.setattr(DPOTrainer, "step", recording_steps(DPOTrainer.step, "step_count", taken.append))
    said: list[str] = []
    resumed = run_dpo(load_config(DPOConfig, stopped / "config.yaml", ["keep_checkpoints=3"]), echo=said.append,
                      resume=True)
    assert taken == list(range(5, steps + 1))
    assert f"dpo: resumed {stopped} at step 4" in said
    assert load_config(DPOConfig, stopped / "config.yaml").keep_checkpoints == 3 and not leftover.exists()
    assert "annotators_per_prompt:" in (stopped / "config.yaml").read_text()  # recorded under the key's own name
    new = assert_rows_kept(before, read_metrics(stopped / "metrics.jsonl"), "step", 4)
    assert new[0]["step"] == 6
    rows, expected = (comparable(read_metrics(run / "metrics.jsonl")) for run in (stopped, straight))
    assert [r["step"] for r in rows] == [r["step"] for r in expected]  # step 6 written again, once
    assert [r["step"] for r in rows][:5] == [3, 4, 6, 8, 9]
    for row, want in zip(rows, expected):
        assert row == pytest.approx(want, abs=1e-6), row["step"]
    adapter, want = (load_file(str(run / "policy" / "adapter_model.safetensors")) for run in (stopped, straight))
    assert adapter.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(adapter[name], value, rtol=0, atol=1e-6, msg=name)
    for key in ("eval/accuracy", "eval/kl", "train/loss_final", "train/responses_forwarded"):
        assert resumed[key] == pytest.approx(summary[key], abs=1e-6), key


@pytest.fixture
def run_cli(capsys):
    """`align dpo ARGS` in this process (tests.cli_in_process): what these tests read is its words and exit code."""
    return lambda *args: run_align_in_process(capsys, "dpo", *args)


def test_resume_mistakes_are_one_line(small_dpo_run, tmp_path, run_cli):
    run = tmp_path / "run"
    result = run_cli("--resume", str(run))
    assert result.returncode == 2 and result.stderr.strip() == f"error: {run}: not a DPO run directory (no config.yaml)"
    run.mkdir()
    (run / "config.yaml").write_text(json.dumps({"policy_model": small_dpo_run[0].split("=", 1)[1]}))
    result = run_cli("--resume", str(run), "beta=0.5")
    assert result.returncode == 2 and "'beta' cannot change on --resume" in result.stderr
    result = run_cli("--resume", str(run))
    assert result.returncode == 2 and result.stderr.strip() == (
        f"error: {run}: no checkpoint to resume from (checkpoints/step-* not found)")
    (run / "config.yaml").write_text("model: {name_or_path: demo}\n")  # a reward run's
    result = run_cli("--resume", str(run))
    assert result.returncode == 2 and result.stderr.startswith(
        f"error: {run}: not a DPO run to resume (its config.yaml has keys a DPO run does not: model)")
    assert "Traceback" not in result.stderr


def test_a_run_resumed_from_another_folder_is_told_where_its_relative_paths_are_read(tmp_path, monkeypatch, capsys):
    # it was told that the folder was "not a DPO run to resume"
    from align.commands.cli import main

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "kw.jsonl").write_text("{}\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("data:\n  format: kwise\n  path: d/kw.jsonl\n")  # as started from tmp_path
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(SystemExit) as exc:
        main(["dpo", "--resume", str(run)])
    assert exc.value.code == 2 and capsys.readouterr().err.strip() == (
        f"error: {run}: cannot resume: its config.yaml: data.path: file not found: d/kw.jsonl (d/kw.jsonl is "
        "relative to the folder the run was started in: resume from that folder, or put the file back)")
    monkeypatch.chdir(tmp_path)  # from there, it is read
    with pytest.raises(SystemExit):
        main(["dpo", "--resume", str(run)])
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_overwrite_removes_the_old_checkpoints_only_once_the_new_run_has_loaded(small_dpo_run, tmp_path, run_cli):
    run = tmp_path / "run"
    old = run / "checkpoints" / "step-000099"
    old.mkdir(parents=True)
    (run / "checkpoints" / "notes.txt").write_text("mine")
    (run / "config.yaml").write_text("seed: 1\n")  # the earlier run's (every run writes its config first)
    args = [o for o in small_dpo_run if not o.startswith("output_dir=")] + [f"output_dir={run}", "overwrite=true"]
    bad = run_cli(*[o for o in args if not o.startswith("policy_model=")], f"policy_model={tmp_path / 'missing'}")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert old.is_dir()  # a run that never started removes nothing
    run_dpo(load_config(DPOConfig, None, [*args, "num_eval_prompts=0", "save_every=0"]), echo=lambda _: None)
    assert not old.exists()  # a stale checkpoint would be taken for the latest on --resume
    assert (run / "checkpoints" / "notes.txt").read_text() == "mine"  # not align's: kept


def test_overwrite_refuses_to_read_what_it_would_replace(small_dpo_run, tmp_path):
    # continuing from a run's own policy into the same output_dir, or training on its metrics, would
    # delete the input as the run starts
    run = tmp_path / "run"
    args = [o for o in small_dpo_run if not o.startswith("output_dir=")] + [f"output_dir={run}", "overwrite=true"]
    (run / "policy").mkdir(parents=True)
    (run / "policy" / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "config.yaml").write_text("seed: 1\n")
    for overrides, key, name in [([f"policy_model={run / 'policy'}"], "policy_model", "policy"),
                                 (["data.format=kwise", f"data.path={run / 'metrics.jsonl'}"], "data.path",
                                  "metrics.jsonl")]:
        with pytest.raises(UserError, match=rf"{key} {run / name} is the earlier run's {name}, which overwrite=true "
                                            "replaces"):
            run_dpo(load_config(DPOConfig, None, [*args, *overrides]), echo=lambda _: None)
    assert (run / "policy" / "adapter_model.safetensors").read_bytes() == b"weights"


def test_an_output_dir_at_or_below_a_file_is_refused(small_dpo_run, tmp_path):
    from align.checkpoint import check_run_dir

    afile = tmp_path / "afile"
    afile.write_text("mine")
    for run in (afile, afile / "run"):
        with pytest.raises(UserError, match=f"output_dir {run}: {afile} is a file, not a directory"):
            check_run_dir(run, resume=False, overwrite=True, prefix="step", command="align dpo")
    assert afile.read_text() == "mine"
