"""`align export`: merged and adapter exports reproduce the trained policy; no half exports."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from align.commands.export import export_run
from align.errors import UserError
from tests.conftest import modes

PROMPTS = ["Tell me about tea.", "How does chess work?", "Give me a quick tip about bread."]


def greedy(model, tokenizer, prompts=PROMPTS):
    from align.chat import render_prompt

    tokenizer.padding_side = "left"
    batch = tokenizer([render_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
    return out[:, batch["input_ids"].shape[1]:].tolist()


def trained_policy(run):
    """The policy exactly as PPO left it: base + adapter through peft, not merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from align.modeling import load_tokenizer

    tokenizer = load_tokenizer(run / "policy")
    base = AutoModelForCausalLM.from_pretrained(
        json.loads((run / "policy" / "adapter_config.json").read_text())["base_model_name_or_path"])
    return PeftModel.from_pretrained(base, run / "policy").eval(), tokenizer


def test_adapter_changed_the_policy(tiny_ppo_run, tiny_random_model):
    from safetensors.torch import load_file

    weights = load_file(tiny_ppo_run / "policy" / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # PPO moved the adapter off its zero init


def test_merged_export_generates_exactly_what_the_policy_did(tiny_ppo_run, tmp_path):
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy, tokenizer = trained_policy(tiny_ppo_run)
    expected = greedy(policy, tokenizer)
    out = export_run(tiny_ppo_run, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)  # plain transformers
    exported_tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert exported_tokenizer.chat_template and (out / "generation_config.json").exists()
    assert greedy(model, exported_tokenizer) == expected
    card = (out / "README.md").read_text()
    assert "base checkpoint" in card and "PPO settings" in card and "gold judge score" in card
    # the policy was trained on its samples at the run's temperature: generate() samples at it by default
    temperature = yaml.safe_load((tiny_ppo_run / "config.yaml").read_text())["temperature"]
    assert temperature != 1.0
    assert (model.generation_config.do_sample, model.generation_config.temperature) == (True, temperature)
    assert f"Trained on its samples at temperature {temperature}" in card


def test_adapter_export_loads_through_peft(tiny_ppo_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy, tokenizer = trained_policy(tiny_ppo_run)
    expected = greedy(policy, tokenizer)
    out = export_run(tiny_ppo_run, tmp_path / "adapter", merge=False)
    assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out).eval()
    assert greedy(model, AutoTokenizer.from_pretrained(out)) == expected


def test_existing_output_and_bad_runs_are_refused(tiny_ppo_run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        export_run(tiny_ppo_run, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"  # nothing touched
    with pytest.raises(UserError, match="run directory not found"):
        export_run(tmp_path / "nope", tmp_path / "out")
    with pytest.raises(UserError, match="neither a PPO or DPO run"):
        export_run(tmp_path / "taken", tmp_path / "out")
    with pytest.raises(UserError, match="neither a PPO or DPO run"):  # a file, not a folder
        export_run(tmp_path / "taken" / "keep.txt", tmp_path / "out")
    # --force never replaces the run itself, a directory holding it, or a part of it
    before = sorted(str(p.relative_to(tiny_ppo_run)) for p in tiny_ppo_run.rglob("*"))
    for out in (tiny_ppo_run, tiny_ppo_run.parent, tiny_ppo_run / "policy"):
        with pytest.raises(UserError, match="overlaps the run"):
            export_run(tiny_ppo_run, out, force=True)
    assert sorted(str(p.relative_to(tiny_ppo_run)) for p in tiny_ppo_run.rglob("*")) == before


@pytest.mark.parametrize(("checkpoint", "config", "command"), [
    ("iter-000002", "seed: 0\n", "align ppo"),
    ("step-000002", "train:\n  seed: 0\n", "align reward train"),
    ("step-000002", "beta: 0.1\n", "align dpo"),
])
def test_an_unfinished_run_is_said_to_be_one_with_the_command_that_finishes_it(tmp_path, checkpoint, config, command):
    run = tmp_path / "run"
    (run / "checkpoints" / checkpoint).mkdir(parents=True)
    (run / "checkpoints" / f".{checkpoint[:-1]}4.tmp-k9").mkdir()  # a save cut short: no checkpoint
    (run / "config.yaml").write_text(config)
    with pytest.raises(UserError, match=f"^{run} is an unfinished {command} run .*: finish it with `{command} "
                                        f"--resume {run}`, then export it$"):
        export_run(run, tmp_path / "out")
    (run / "checkpoints" / checkpoint).rmdir()
    with pytest.raises(UserError, match="neither a PPO or DPO run"):
        export_run(run, tmp_path / "out")


def test_a_folder_of_runs_points_to_them_and_a_run_given_as_a_model_to_its_policy(tiny_ppo_run, tmp_path):
    from align.modeling import resolve_model_path

    demo = tmp_path / "demo"  # as `align demo` leaves one: stage runs, and its policy exported already
    demo.mkdir()
    (demo / "ppo").symlink_to(tiny_ppo_run, target_is_directory=True)
    (demo / "export").mkdir()
    (demo / "export" / "README.md").write_text("# Aligned policy exported by align\n")
    with pytest.raises(UserError) as refused:
        export_run(demo, tmp_path / "out")
    assert str(refused.value) == (f"{demo} is not a run but holds 1: export one of {demo / 'ppo'}; its policy is "
                                  f"exported already, in {demo / 'export'}")
    with pytest.raises(UserError) as refused:  # policy_model=RUN: the aligned policy is RUN/policy
        resolve_model_path(tiny_ppo_run)
    assert str(refused.value).endswith(f"is not a model checkpoint (no config.json or adapter_config.json); the one "
                                       f"in it is {tiny_ppo_run / 'policy'}")
    assert not (tmp_path / "out").exists()


def test_a_run_missing_its_weights_or_with_damaged_json_is_refused(tiny_ppo_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_ppo_run, run)
    config = run / "policy" / "adapter_config.json"
    config.write_text("{not json")
    for merge in (True, False):
        with pytest.raises(UserError, match=rf"^{config}: damaged \(not valid JSON\)"):
            export_run(run, tmp_path / "out", merge=merge)
    shutil.copy2(tiny_ppo_run / "policy" / "adapter_config.json", config)
    (run / "policy" / "adapter_model.safetensors").unlink()
    for merge in (True, False):
        with pytest.raises(UserError, match="no model weights"):
            export_run(run, tmp_path / "out", merge=merge)
    assert not (tmp_path / "out").exists()


def test_killed_export_leaves_no_output_directory(tiny_ppo_run, tmp_path):
    out = tmp_path / "export"
    # Pause the export after the weights are written, before the final rename, then kill -9 it.
    code = (
        "import sys, time\n"
        "import align.commands.export as e\n"
        "original = e._export_policy\n"
        "def slow(*args):\n"
        "    original(*args)\n"
        "    print('WRITTEN', flush=True)\n"
        "    time.sleep(60)\n"
        "e._export_policy = slow\n"
        f"e.export_run({str(tiny_ppo_run)!r}, {str(out)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITTEN"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    assert list(tmp_path.glob(".export.tmp-*"))  # the hidden temporary is all that remains
    export_run(tiny_ppo_run, out)  # a new export succeeds and clears the stale temporary
    assert (out / "model.safetensors").exists() and not list(tmp_path.glob(".export.tmp-*"))


def test_cli_export_reports_user_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "align", "export", str(tmp_path / "missing"), "--out",
                             str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "run directory not found" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def tiny_reward_run(tiny_random_model, tmp_path_factory):
    """A finished LoRA reward run from `align reward train` (a few steps on the synthetic task)."""
    from align.config import load_config
    from reward.config import RewardConfig
    from reward.train import train_reward_model

    run = tmp_path_factory.mktemp("reward-run") / "run"
    cfg = load_config(RewardConfig, None, [
        f"model.name_or_path={tiny_random_model}", f"output_dir={run}", "model.max_length=160",
        "data.num_rankings=32", "data.num_eval_rankings=12", "train.batch_size=16", "train.max_steps=2",
        "eval.normalize_prompts=4", "eval.normalize_response_length=8", "train.num_threads=1",
        "lora.enabled=true", "lora.r=4",
    ])
    train_reward_model(cfg, echo=lambda text: None)
    return run


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_reward_export_keeps_scores_and_provenance(tiny_reward_run, tiny_random_model, tmp_path, merge):
    from reward.model import load_reward_model
    from reward.run_dir import INFO_FILE, RewardRun

    out = export_run(tiny_reward_run, tmp_path / "rm", merge=merge)
    assert (out / "adapter_config.json").exists() != merge
    prompts, responses = PROMPTS, ["Tea is a drink.", "Chess is a game.", "Bake it hot."]
    expected = load_reward_model(tiny_reward_run).score(prompts, responses)
    assert torch.allclose(load_reward_model(out).score(prompts, responses), expected, atol=1e-5)
    exported, original = RewardRun.open(out), RewardRun.open(tiny_reward_run)
    assert json.loads((out / INFO_FILE).read_text()) == original.info()
    assert exported.base_model() == str(tiny_random_model)
    assert exported.summary()["eval/accuracy"] == original.summary()["eval/accuracy"]
    card = (out / "README.md").read_text()
    assert f"base checkpoint: `{tiny_random_model}`" in card
    assert f"held-out pairwise accuracy: {original.summary()['eval/accuracy']:.4g}" in card
    assert f"training rankings: {original.summary()['train/rankings']}" in card
    assert "data: synthetic" in card


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_a_fully_fine_tuned_reward_model_export_says_it_is_whole_and_nothing_merged(random_reward_model, tmp_path,
                                                                                   merge):
    # a fully fine-tuned reward model has no adapter and is copied whole whichever was asked: its card says
    # what the folder holds, neither "PEFT adapter" nor "merged"
    out = export_run(random_reward_model, tmp_path / "rm", merge=merge)
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "full weights of a fully fine-tuned model" in card
    assert "no adapter merged" in card and "merged weights" not in card
    assert "peft" not in card.lower()


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
@pytest.mark.parametrize("size", ["half", "empty"])
def test_truncated_weights_are_refused_before_anything_is_written(tiny_ppo_run, random_reward_model, tmp_path,
                                                                  merge, size):
    # an adapter export and a fully fine-tuned reward model copy the weights without loading them
    policy_run = shutil.copytree(tiny_ppo_run, tmp_path / "run")
    reward_model = shutil.copytree(random_reward_model, tmp_path / "rm")
    for weights in (policy_run / "policy" / "adapter_model.safetensors", reward_model / "model.safetensors"):
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size // 2 if size == "half" else 0)
    before = sorted(p.name for p in tmp_path.iterdir())
    for source, weights in [(policy_run, policy_run / "policy" / "adapter_model.safetensors"),
                            (reward_model, reward_model / "model.safetensors")]:
        with pytest.raises(UserError, match=rf"^{re.escape(str(weights))}: damaged or truncated weights \("):
            export_run(source, tmp_path / "out" / "export", merge=merge)
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no --out, no temporary


@pytest.mark.parametrize("merge", [True, False])
def test_an_export_is_readable_as_a_plain_mkdir_and_open_would_leave_it(tiny_ppo_run, tmp_path, umask, merge):
    # it was 0700 (mkdtemp) with a 0600 model.safetensors: a serving account could not read it
    umask(0o022)
    out = export_run(tiny_ppo_run, tmp_path / "export", merge=merge)
    found = modes(out)
    assert ("model.safetensors" if merge else "adapter_model.safetensors") in found and "README.md" in found
    assert found == {name: 0o755 if name == "." else 0o644 for name in found}


def test_ppo_model_card_describes_its_reward_model(tiny_ppo_run, tmp_path):
    out = export_run(tiny_ppo_run, tmp_path / "policy", merge=False)
    card = (out / "README.md").read_text()
    assert "## Reward model" in card and "reward model: `" in card


def test_the_model_card_says_what_it_cannot_know_rather_than_guess(tiny_ppo_run, tmp_path, monkeypatch):
    import yaml

    run = tmp_path / "run"
    shutil.copytree(tiny_ppo_run, run)
    summary = json.loads((run / "summary.json").read_text())
    # stopped in its final evaluation: no held-out results to show
    (run / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if not k.startswith("eval/")}))
    # its reward model named relative to the folder it started in, which the export is not run from
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "reward_model": "rw"}))
    (tmp_path / "rw").mkdir()  # another folder of that name where the export runs
    monkeypatch.chdir(tmp_path)
    card = (export_run(run, tmp_path / "policy", merge=False) / "README.md").read_text()
    assert "No held-out samples: the run's summary has none" in card and "| metric |" not in card
    assert "- `rw` (as the run's config names it: relative to the folder the run started in)" in card
    # a reward model found there from this folder: its section, with where it was read from
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "reward_model": os.path.relpath(config["reward_model"])}))
    card = (export_run(run, tmp_path / "policy2", merge=False) / "README.md").read_text()
    assert "reward model: `" in card and "relative to the folder the run started in; read here from the folder" in card


def test_a_policy_trained_on_an_adapter_exports_with_every_level_merged(tiny_ppo_run, tiny_random_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from align.modeling import load_tokenizer
    from tests.adapters import merged_by_hand, save_random_adapter

    tokenizer = load_tokenizer(tiny_ppo_run / "policy")
    first = save_random_adapter(tiny_random_model, tmp_path / "sft-adapter", tokenizer, seed=1)
    run = _rebase(tiny_ppo_run, tmp_path, "policy", first)  # the run's policy_model was that adapter
    out = export_run(run, tmp_path / "merged")
    ids = tokenizer(["Tell me about tea."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)(ids).logits
        expected = merged_by_hand(tiny_random_model, [first, run / "policy"], tokenizer)(ids).logits
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-5)


def _rebase(run, tmp_path, adapter_dir, base):
    """A copy of `run` whose adapter at `adapter_dir` (relative to the run) names `base`; a policy's record
    of the model it was trained on says `base` too, as the run's own would have."""
    from align.provenance import MODELS_RECORD_FILE, write_models_record

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config_path = copy / adapter_dir / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": str(base)}))
    if adapter_dir == "policy" and (copy / MODELS_RECORD_FILE).exists():
        write_models_record(copy / MODELS_RECORD_FILE, {"policy_model": base})
    return copy


def test_a_merged_export_keeps_the_dtype_of_a_bf16_base(tiny_ppo_run, tiny_random_model, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from align.modeling import load_tokenizer
    from tests.adapters import bf16_copy, merged_by_hand

    base = bf16_copy(tiny_random_model, tmp_path / "bf16-base")
    run = _rebase(tiny_ppo_run, tmp_path, "policy", base)
    out = export_run(run, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    tokenizer = load_tokenizer(run / "policy")
    ids = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    expected = merged_by_hand(base, [run / "policy"], tokenizer)  # the run's policy, in fp32
    exported = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert exported.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(exported(**ids).logits.float(), expected(**ids).logits, atol=0.05, rtol=0.02)


def test_a_merged_reward_export_keeps_the_dtype_of_a_bf16_base(tiny_reward_run, tiny_random_model, tmp_path):
    from safetensors.torch import load_file

    from reward.model import load_reward_model
    from tests.adapters import bf16_copy

    run = _rebase(tiny_reward_run, tmp_path, "model", bf16_copy(tiny_random_model, tmp_path / "bf16-base"))
    out = export_run(run, tmp_path / "rm")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {w.dtype for w in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    responses = ["Tea is a drink.", "Chess is a game.", "Bake it hot."]
    expected = load_reward_model(run, device="cpu").score(PROMPTS, responses)
    got = load_reward_model(out, device="cpu", dtype=torch.bfloat16).score(PROMPTS, responses)
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)


@pytest.mark.parametrize(("method", "in_loss"), [("ppo", False), ("rloo", False), ("grpo", True)])
def test_the_model_card_lists_the_settings_the_method_used(tiny_ppo_run, tmp_path, method, in_loss):
    import yaml

    run = tmp_path / "run"
    shutil.copytree(tiny_ppo_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["kl"]["in_loss"] is None  # "by method", as a config leaves it by default
    config.update(method=method, samples_per_prompt=1 if method == "ppo" else 4)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    card = (export_run(run, tmp_path / "out", merge=False) / "README.md").read_text()
    assert f"- method: {method}" in card and f"in_loss={in_loss}" in card
    for key in ("vf_coef", "gamma", "gae_lambda"):  # the value model's settings, which only PPO has
        assert (f"- {key}:" in card) == (method == "ppo"), key


@pytest.mark.parametrize("below", ["x", "x/y"])
def test_an_output_below_a_file_is_one_line(tiny_ppo_run, tmp_path, below):
    (tmp_path / "plainfile").write_text("mine")
    out = tmp_path / "plainfile" / below
    with pytest.raises(UserError, match=rf"--out {out}: cannot create directory .*: {tmp_path / 'plainfile'} is a file, not a directory"):
        export_run(tiny_ppo_run, out)
    result = subprocess.run([sys.executable, "-m", "align", "export", str(tiny_ppo_run), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "is a file, not a directory" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "plainfile").read_text() == "mine"


def _weights(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir() if p.suffix == ".safetensors"}


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_force_never_replaces_the_base_the_run_was_trained_on(tiny_ppo_run, tmp_path, merge):
    # the base is itself an earlier export (a policy trained on from there): --force over it replaced the
    # SFT weights with the merged policy, or with an adapter whose base was then itself
    base = export_run(tiny_ppo_run, tmp_path / "pol_copy")
    run = _rebase(tiny_ppo_run, tmp_path, "policy", base)
    before = _weights(base)
    assert before
    for out in (base, base / "inside"):
        with pytest.raises(UserError, match="^" + re.escape(f"--out {out} overlaps {base}, a checkpoint the export reads")):
            export_run(run, out, merge=merge, force=True)
    assert _weights(base) == before and not (base / "inside").exists()
    assert not (base / "adapter_config.json").exists()


def test_force_never_replaces_a_folder_that_is_not_an_earlier_export(tiny_ppo_run, tmp_path):
    data = tmp_path / "data3"
    data.mkdir()
    for i in range(9):
        (data / f"part{i}.jsonl").write_text(f'{{"prompt": "p{i}", "response": "r"}}\n')
    kept = {p.name: p.read_text() for p in data.iterdir()}
    expected = f"--out {data} is not an earlier export"
    with pytest.raises(UserError, match="^" + re.escape(expected)):
        export_run(tiny_ppo_run, data, force=True)
    result = subprocess.run([sys.executable, "-m", "align", "export", str(tiny_ppo_run), "--out", str(data), "--force"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {expected}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert {p.name: p.read_text() for p in data.iterdir()} == kept
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(UserError, match="is not an earlier export"):
        export_run(tiny_ppo_run, tmp_path / "a-file", force=True)
    assert (tmp_path / "a-file").read_text() == "mine"


def test_force_replaces_an_earlier_export_or_an_empty_folder(tiny_ppo_run, tmp_path):
    out = export_run(tiny_ppo_run, tmp_path / "export", merge=False)
    assert (out / "adapter_config.json").exists()
    export_run(tiny_ppo_run, out, force=True)  # the adapter export becomes a merged one
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert "format: merged weights" in (out / "README.md").read_text()
    (tmp_path / "empty").mkdir()
    assert (export_run(tiny_ppo_run, tmp_path / "empty", merge=False, force=True) / "adapter_config.json").exists()
    assert not list(tmp_path.glob(".*.old-*")) and not list(tmp_path.glob(".*.tmp-*"))


def test_the_export_samples_as_the_run_did_not_with_the_bases_filters(tmp_path):
    # a base that samples with top-p, top-k and a repetition penalty (as instruct checkpoints ship): the
    # exported policy samples at the run's temperature alone, as PPO trained it, its other settings kept
    from transformers import GenerationConfig

    from align.commands.export import _sample_as_trained

    GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1, eos_token_id=[7, 9],
                     max_new_tokens=512).save_pretrained(tmp_path)
    _sample_as_trained(tmp_path, model=None, temperature=0.7)
    config = GenerationConfig.from_pretrained(tmp_path)
    assert (config.do_sample, config.temperature, config.top_k, config.top_p, config.repetition_penalty) == (
        True, 0.7, 0, 1.0, 1.0)
    assert config.eos_token_id == [7, 9] and config.max_new_tokens == 512


def test_the_export_command_says_what_it_wrote_on_stdout(tiny_ppo_run, tmp_path, capsys):
    from align.commands.cli import main

    out = tmp_path / "adapter"
    with pytest.raises(SystemExit) as exc:
        main(["export", str(tiny_ppo_run), "--out", str(out), "--adapter"])
    said = capsys.readouterr()
    assert exc.value.code in (0, None) and (out / "adapter_config.json").exists()
    assert said.out == f"exported the policy of {tiny_ppo_run} to {out}: PEFT adapter on its base checkpoint\n"
