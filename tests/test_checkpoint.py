"""align.checkpoint's checks of a checkpoint against the run that resumes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from align.checkpoint import check_same_run, data_fingerprint, flat_config, resumed_line
from align.errors import UserError
from align.provenance import model_fingerprint

CONFIG = {"seed": 0, "train": {"learning_rate": 1e-3, "save_every": 50}, "output_dir": "runs/a"}


def test_flat_config_names_settings_by_their_dotted_keys():
    assert flat_config(CONFIG) == {"seed": 0, "train.learning_rate": 1e-3, "train.save_every": 50,
                                   "output_dir": "runs/a"}


def test_a_resumed_run_says_where_it_continues_or_that_its_training_had_finished(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert resumed_line("dpo", run, 4, 12, "step") == f"dpo: resumed {run} at step 4"
    assert resumed_line("ppo", run, 80, 80, "iteration") == (
        f"ppo: resumed {run} at iteration 80 of 80: its training had finished, so only the evaluation runs again")
    (run / "summary.json").write_text("{}")  # a run that finished after its last checkpoint
    assert resumed_line("dpo", run, 8, 12, "step") == (
        f"dpo: resumed {run} at step 8 of 12: its training had finished after its last checkpoint, so steps 9-12 "
        "are trained again (to the same result), then the evaluation runs")


def test_a_run_resumes_only_with_the_settings_and_data_it_was_trained_with():
    state = {"config": CONFIG, "data": data_fingerprint([1, 2, 3]), "num_steps": 8}
    path = Path("runs/a/checkpoints/step-000004")
    moved = {**CONFIG, "output_dir": "runs/b", "train": {**CONFIG["train"], "save_every": 10}}
    check_same_run(path, state, config=moved, may_change={"train.save_every"}, data=data_fingerprint([1, 2, 3]),
                   num_steps=8)  # a copied run, a setting that may change
    changed = {**CONFIG, "train": {**CONFIG["train"], "learning_rate": 0.5}}
    with pytest.raises(UserError, match="train.learning_rate is 0.5 where the run had 0.001"):
        check_same_run(path, state, config=changed, may_change=set())
    with pytest.raises(UserError, match="the training data differ"):
        check_same_run(path, state, config=CONFIG, may_change=set(), data=data_fingerprint([1, 3, 2]))
    with pytest.raises(UserError, match="belongs to a run of 8 steps, this one plans 9"):
        check_same_run(path, state, config=CONFIG, may_change=set(), num_steps=9)
    # a checkpoint written before checkpoints held their config and data: resumed on the run's config.yaml
    check_same_run(path, {"num_steps": 8}, config=changed, may_change=set(), data="x", num_steps=8)
    check_same_run(path, {"config": CONFIG}, config=CONFIG, may_change=set(), num_steps=8)  # nor its steps
    # a key that may change is named in full: another section's key of the same name may not
    other = {**CONFIG, "eval": {"save_every": 1}}
    with pytest.raises(UserError, match="eval.save_every is 2 where the run had 1"):
        check_same_run(path, {"config": other}, config={**other, "eval": {"save_every": 2}},
                       may_change={"train.save_every"})


def test_a_models_fingerprint_follows_its_weights_configs_and_adapter_bases_not_its_place(tmp_path):
    import json
    import shutil

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir(), adapter.mkdir()
    weights = bytes(range(256)) * (3 * 2**12)  # 3 MiB: read at its first and last MiB
    (base / "model.safetensors").write_bytes(weights)
    (base / "config.json").write_text('{"model_type": "llama"}')
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    (adapter / "adapter_model.safetensors").write_bytes(b"lora")
    first = model_fingerprint(adapter)

    (adapter / "README.md").write_text("notes")  # not a model file
    shutil.copytree(adapter, tmp_path / "moved")
    assert model_fingerprint(adapter) == model_fingerprint(tmp_path / "moved") == first
    for change in (weights[:-1] + b"x", b"x" + weights[1:]):  # its last MiB, its first
        (base / "model.safetensors").write_bytes(change)
        assert model_fingerprint(adapter) != first  # the base the adapter names changed
    (base / "model.safetensors").write_bytes(weights)
    assert model_fingerprint(adapter) == first
    (base / "config.json").write_text('{"model_type": "qwen2"}')
    assert model_fingerprint(adapter) != first


def _tiny_checkpoint(folder: Path) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "chat_template.jinja").write_text("{{ messages[0].content }}")
    return folder


def test_a_run_resumes_only_with_the_models_it_was_trained_with(tmp_path):
    sft = _tiny_checkpoint(tmp_path / "sft")
    path = Path("runs/a/checkpoints/step-000004")
    state = {"config": {**CONFIG, "policy_model": "sft"}, "models": {"policy_model": model_fingerprint(sft)}}
    check_same_run(path, state, config=state["config"], may_change=set(), models={"policy_model": sft})
    (sft / "model.safetensors").write_bytes(b"other weights")
    with pytest.raises(UserError, match=r"the model policy_model names \(sft\) is not the one the run was trained with"):
        check_same_run(path, state, config=state["config"], may_change=set(), models={"policy_model": sft})
    # a checkpoint written before checkpoints held their models' fingerprints, a model it did not hold
    check_same_run(path, {"config": state["config"]}, config=state["config"], may_change=set(),
                   models={"policy_model": sft})
    check_same_run(path, state, config=state["config"], may_change=set(), models={"reward_model": sft})
    with pytest.raises(UserError, match="its chat template edited"):  # a damaged record is not this model's
        check_same_run(path, {**state, "models": {"policy_model": 5}}, config=state["config"], may_change=set(),
                       models={"policy_model": sft})


def test_an_edited_chat_template_is_another_model_but_older_fingerprints_still_resume(tmp_path):
    sft = _tiny_checkpoint(tmp_path / "sft")
    path = Path("runs/a/checkpoints/iter-000004")
    config = {**CONFIG, "policy_model": "sft"}
    state = {"config": config, "models": {"policy_model": model_fingerprint(sft)}}
    before_templates = {"config": config, "models": {"policy_model": model_fingerprint(sft, templates=False)}}
    (sft / "chat_template.jinja").write_text("{{ messages[-1].content }}")
    with pytest.raises(UserError, match="policy_model"):  # the policy would be prompted otherwise than it was
        check_same_run(path, state, config=config, may_change=set(), models={"policy_model": sft})
    # a checkpoint whose fingerprints did not read templates resumes on its weights and tokenizer as before
    check_same_run(path, before_templates, config=config, may_change=set(), models={"policy_model": sft})
    (sft / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(UserError, match="policy_model"):
        check_same_run(path, before_templates, config=config, may_change=set(), models={"policy_model": sft})


def test_a_checkpoint_holding_a_former_key_name_resumes_under_the_new_one():
    path = Path("runs/a/checkpoints/step-000004")
    state = {"config": {"eval": {"old": 16}}}
    check_same_run(path, state, config={"eval": {"new": 16}}, may_change=set(), aliases={"eval.old": "eval.new"})
    with pytest.raises(UserError, match="eval.new is 32 where the run had 16"):
        check_same_run(path, state, config={"eval": {"new": 32}}, may_change=set(), aliases={"eval.old": "eval.new"})


HOLDER = """
import pathlib, sys
from align.checkpoint import hold_run_dir
hold_run_dir(pathlib.Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(sys.platform == "win32", reason="flock(2)")
def test_a_run_directory_another_run_is_using_is_refused_until_that_run_ends(tmp_path):
    from align.checkpoint import check_run_dir, release_run_dir, start_run_dir
    from dpo.config import DPOConfig

    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        for start in (lambda: check_run_dir(run, resume=False, overwrite=True, prefix="step", command="align dpo"),
                      lambda: start_run_dir(run, DPOConfig(), "step", (), resume=False)):
            with pytest.raises(UserError, match=f"output_dir {run} is in use by a run that has not ended"):
                start()
        assert list(run.iterdir()) == []  # nothing written
    finally:
        other.stdin.close()
        other.wait(30)
    check_run_dir(run, resume=False, overwrite=True, prefix="step", command="align dpo")  # that run has ended
    start_run_dir(run, DPOConfig(), "step", (), resume=False)  # this process holds it already: the same run
    release_run_dir(run)


def test_overwrite_refuses_a_folder_that_holds_a_runs_names_but_no_run(tmp_path):
    # a user's `model/` and `summary.json` beside no config.yaml: overwrite=true deleted them by name
    from align.checkpoint import check_run_dir, release_run_dir

    run = tmp_path / "proj"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    (run / "summary.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(UserError) as info:
        check_run_dir(run, resume=False, overwrite=True, prefix="step", command="align reward train",
                      outputs=("model", "summary.json"))
    assert str(info.value) == (f"output_dir {run} holds model, summary.json but no run's config.yaml: overwrite=true "
                               "replaces an earlier `align reward train` run only, and would delete them; choose "
                               "another output_dir")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    (run / "summary.json").unlink()
    (run / "model" / "config.json").unlink()
    (run / "model").rmdir()
    # other files only: nothing a run would delete, so the run may go in beside them
    check_run_dir(run, resume=False, overwrite=True, prefix="step", command="align reward train",
                  outputs=("model", "summary.json"))
    release_run_dir(run)


@pytest.mark.parametrize("resume", [True, False])
def test_a_run_folder_that_cannot_be_written_is_refused_before_anything_loads(tmp_path, monkeypatch, resume):
    # a folder remounted read-only: a resume failed at its first write (config.yaml), models loaded
    import os

    from align import checkpoint

    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    access = os.access
    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: False if Path(path) == run else access(path, mode))
    with pytest.raises(UserError, match=f"^output_dir {run}: the folder is not writable$"):
        checkpoint.check_run_dir(run, resume=resume, overwrite=True, prefix="step", command="align dpo")


@pytest.mark.parametrize("resume", [True, False])
def test_a_run_starting_drops_what_a_save_cut_short_left(tmp_path, resume):
    from align.checkpoint import release_run_dir, start_run_dir
    from align.config import load_config
    from dpo.config import DPOConfig

    run = tmp_path / "run"
    (run / "checkpoints" / ".step-000004.tmp-k9").mkdir(parents=True)  # killed in a checkpoint's save
    (run / "checkpoints" / "step-000002").mkdir()
    (run / ".policy.tmp-x1").mkdir()  # killed in the final policy's save
    (run / ".policy.tmp-x1" / "adapter_model.safetensors").write_bytes(b"half")
    (run / ".summary.json.a8f").write_text("{")  # in write_json_atomic's
    (run / "policy").mkdir()
    (run / ".notes").write_text("the user's")  # hidden, but no temporary of the run's
    start_run_dir(run, load_config(DPOConfig, None, []), "step", ("policy", "summary.json"), resume=resume)
    release_run_dir(run)
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    kept = ["checkpoints/step-000002", "policy"] if resume else []
    assert left == sorted([".notes", "checkpoints", "config.yaml", *kept])


def test_a_sharded_checkpoint_that_cannot_be_read_is_one_line_naming_the_ranks_error():
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    from align.checkpoint import damaged_checkpoint

    missing = FileNotFoundError(2, "No such file or directory")
    missing.filename = "run/checkpoints/iter-000006/sharded/__1_0.distcp"
    exc = CheckpointException("CheckpointException ranks:dict_keys([0, 1])", {
        0: (missing, traceback.StackSummary.from_list([])), 1: (missing, traceback.StackSummary.from_list([]))})
    message = str(damaged_checkpoint(Path("run/checkpoints/iter-000006"), exc))
    assert "\n" not in message and message.startswith("run/checkpoints/iter-000006 is incomplete or damaged "
                                                      "(FileNotFoundError: [Errno 2] No such file or directory: ")
    assert "__1_0.distcp" in message and "Traceback" not in message


@pytest.mark.parametrize(("written_by", "resumed_by", "said"), [
    (2, 1, "written by 2 processes; resume it with the same number (this run has 1 process)"),
    (1, 2, "written by 1 process; resume it with the same number (this run has 2 processes)")])
def test_a_checkpoint_resumes_only_on_as_many_processes_as_wrote_it(tmp_path, written_by, resumed_by, said):
    import json
    from types import SimpleNamespace

    import torch

    from align.checkpoint import STATE_FILE, load_training_state

    (tmp_path / STATE_FILE).write_text(json.dumps({"world_size": written_by}), encoding="utf-8")
    model = torch.nn.Linear(2, 2)
    before = model.weight.detach().clone()
    with pytest.raises(UserError, match=said.replace("(", r"\(").replace(")", r"\)")):
        load_training_state(tmp_path, accelerator=SimpleNamespace(num_processes=resumed_by), model=model,
                            optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=None, sharded=False)
    assert torch.equal(model.weight, before)
