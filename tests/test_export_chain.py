"""`align export` of a policy trained on an SFT model that is itself a LoRA adapter (the model card's own
loading code builds the model the adapter was trained on), and of a run whose base changed since it was
trained (RUN/trained_on.json: the export is refused, in one line naming the base and what changed)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from align.commands.export import export_run
from align.errors import UserError
from align.provenance import MODELS_RECORD_FILE, model_fingerprint, write_models_record

TEXTS = ["hello there, how are you", "Tell me about tea."]


def card_model(out):
    """The model the exported folder's README.md says to load, built by its own code (plain transformers and peft)."""
    card = (out / "README.md").read_text()
    scope = {"DIR": str(out)}
    exec(card.split("```python\n")[1].split("```")[0], scope)
    return scope["model"].eval(), scope["tokenizer"]


def same_logits(model, merged_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, local_files_only=True).eval()
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        got, expected = model(**batch).logits, merged(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def chained_dpo_run(tiny_random_model, tmp_path_factory):
    """A finished DPO run whose policy_model is an SFT LoRA adapter on the tiny model (align merges the
    chain, then trains its own adapter on top), with that SFT adapter."""
    from align.config import load_config
    from align.modeling import load_tokenizer
    from dpo.config import DPOConfig
    from dpo.train import DPOTrainer
    from tests.adapters import save_random_adapter

    root = tmp_path_factory.mktemp("chained-dpo")
    sft = save_random_adapter(tiny_random_model, root / "sft-adapter", load_tokenizer(tiny_random_model), seed=3)
    trainer = DPOTrainer(load_config(DPOConfig, None, [
        f"policy_model={sft}", f"output_dir={root / 'run'}", "data.num_rankings=8", "data.num_eval_rankings=4",
        "data.k=3", "batch_size=4", "epochs=1", "learning_rate=1e-2", "num_eval_prompts=0", "progress=false",
        "num_threads=1"]), echo=lambda _: None)
    trainer.setup()
    trainer.train()
    trainer.finish()
    return root / "run", sft


def test_the_card_of_an_adapter_on_an_sft_adapter_builds_the_model_it_was_trained_on(chained_dpo_run, tmp_path,
                                                                                    tiny_random_model):
    # it loaded the SFT adapter folder with AutoModelForCausalLM (transformers attaches it unmerged) and put
    # the trained adapter on the same layers, which dropped the SFT adapter: logits 0.59 off the merged export
    run, sft = chained_dpo_run
    out = export_run(run, tmp_path / "adapter", merge=False)
    model, tokenizer = card_model(out)
    same_logits(model, export_run(run, tmp_path / "merged"), tokenizer)
    card = (out / "README.md").read_text()
    note = next(line for line in card.splitlines() if "applies on the merged SFT model" in line)
    assert f"`{tiny_random_model.resolve()}` with the LoRA adapter `{sft.resolve()}` merged in" in note
    assert "--merge" in note
    assert not any("applies on the merged SFT model" in line
                   for line in (export_run(run, tmp_path / "m2") / "README.md").read_text().splitlines())


def test_the_card_of_an_adapter_on_a_plain_base_still_loads_the_policy(tiny_ppo_run, tmp_path):
    out = export_run(tiny_ppo_run, tmp_path / "adapter", merge=False)
    model, tokenizer = card_model(out)
    same_logits(model, export_run(tiny_ppo_run, tmp_path / "merged"), tokenizer)
    assert "merged SFT model" not in (out / "README.md").read_text()


def test_a_finished_run_records_the_model_chain_its_adapter_was_trained_on(chained_dpo_run, tiny_ppo_run,
                                                                          tiny_random_model, tmp_path):
    run, sft = chained_dpo_run
    record = json.loads((run / MODELS_RECORD_FILE).read_text())["policy_model"]
    assert record["path"] == str(sft.resolve()) and record["fingerprint"] == model_fingerprint(sft)
    assert [level["path"] for level in record["chain"]] == [str(sft.resolve()), str(tiny_random_model.resolve())]
    assert "adapter_model.safetensors" in record["chain"][0]["files"] and "config.json" in record["chain"][1]["files"]
    ppo = json.loads((tiny_ppo_run / MODELS_RECORD_FILE).read_text())["policy_model"]  # PPO's final save too
    assert ppo["fingerprint"] == model_fingerprint(tiny_random_model)
    # beside RUN/policy, not in it: an adapter export ships that folder's files
    assert not (run / "policy" / MODELS_RECORD_FILE).exists()
    assert not (export_run(run, tmp_path / "adapter", merge=False) / MODELS_RECORD_FILE).exists()


def _run_on_own_base(tiny_ppo_run, tiny_random_model, tmp_path, *, sft_adapter=False):
    """A copy of the PPO run trained (as its adapter and record say) on a base of its own, which a test may
    rebuild; `sft_adapter`: on an SFT adapter on that base. Returns the run, the base and what the adapter names."""
    from align.modeling import load_tokenizer
    from tests.adapters import save_random_adapter

    base = tmp_path / "base"
    shutil.copytree(tiny_random_model, base)
    named = save_random_adapter(base, tmp_path / "sft", load_tokenizer(base), seed=2) if sft_adapter else base
    run = tmp_path / "run"
    shutil.copytree(tiny_ppo_run, run)
    config_path = run / "policy" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "base_model_name_or_path": str(named)}))
    write_models_record(run / MODELS_RECORD_FILE, {"policy_model": named})
    return run, base, named


def test_a_base_whose_weights_and_config_are_unchanged_exports(tiny_ppo_run, tiny_random_model, tmp_path):
    # its generation config edited, a trainer's notes and a tokenizer file added: the adapter goes onto the same
    # weights (a refusal here blocked every run trained on a base whose generation_config.json was tuned)
    run, base, _ = _run_on_own_base(tiny_ppo_run, tiny_random_model, tmp_path)
    generation = base / "generation_config.json"
    generation.write_text(json.dumps({**json.loads(generation.read_text()), "top_p": 0.9, "max_new_tokens": 256}))
    (base / "trainer_state.json").write_text("{}")
    (base / "added_tokens.json").write_text("{}")
    assert export_run(run, tmp_path / "out").is_dir()
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    with pytest.raises(UserError, match=r"\(config\.json changed; rebuilt or trained again in place\?\)"):
        export_run(run, tmp_path / "again")


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_an_export_onto_a_base_rebuilt_in_place_is_refused_in_one_line(tiny_ppo_run, tiny_random_model, tmp_path,
                                                                       merge, capsys):
    from align.commands.cli import main
    from align.demo_model import build_random_model

    run, base, _ = _run_on_own_base(tiny_ppo_run, tiny_random_model, tmp_path)
    kept = tmp_path / "kept"
    shutil.copytree(base, kept)
    shutil.rmtree(base)
    build_random_model(base, seed=1)  # trained again into the same folder: the same shapes, other weights
    expected = f"{run}: its policy_model {base} changed since the run was trained on it ("
    with pytest.raises(UserError, match="^" + re.escape(expected) + r"[^)]*model\.safetensors changed") as exc:
        export_run(run, tmp_path / "out", merge=merge)
    assert f"delete {run / MODELS_RECORD_FILE} to export the run anyway" in str(exc.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    with pytest.raises(SystemExit) as code:
        main(["export", str(run), "--out", str(tmp_path / "out"), *([] if merge else ["--adapter"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and len(err) == 1 and err[0] == f"error: {exc.value}"
    shutil.rmtree(base)
    shutil.copytree(kept, base)  # restored: the export goes on
    assert export_run(run, tmp_path / "out", merge=merge).is_dir()


def test_a_changed_base_down_the_sft_adapter_chain_is_named(tiny_ppo_run, tiny_random_model, tmp_path):
    from align.demo_model import build_random_model

    run, base, sft = _run_on_own_base(tiny_ppo_run, tiny_random_model, tmp_path, sft_adapter=True)
    shutil.rmtree(base)
    build_random_model(base, seed=1)
    with pytest.raises(UserError, match=re.escape(f"its policy_model {sft} changed since the run was trained on it "
                                                  f"(its base {base}: ") + r"[^)]*model\.safetensors changed"):
        export_run(run, tmp_path / "out", merge=False)


def test_an_adapter_renamed_onto_another_base_is_refused_and_a_moved_one_is_not(tiny_ppo_run, tiny_random_model,
                                                                                tmp_path):
    from align.demo_model import build_random_model

    run, base, _ = _run_on_own_base(tiny_ppo_run, tiny_random_model, tmp_path)
    config_path = run / "policy" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    moved = shutil.copytree(base, tmp_path / "moved")  # the same files elsewhere: the same base
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": str(moved)}))
    assert export_run(run, tmp_path / "out").is_dir()
    other = build_random_model(tmp_path / "other", seed=1)
    config_path.write_text(json.dumps({**config, "base_model_name_or_path": str(other)}))
    with pytest.raises(UserError, match=re.escape(f"its policy_model is now {other}, which is not the {base} the run "
                                                  "was trained on (") + r"[^)]*model\.safetensors changed"):
        export_run(run, tmp_path / "out2")


def test_a_run_finished_before_runs_kept_the_record_exports_as_before(tiny_ppo_run, tiny_random_model, tmp_path):
    from align.demo_model import build_random_model

    run, base, _ = _run_on_own_base(tiny_ppo_run, tiny_random_model, tmp_path)
    (run / MODELS_RECORD_FILE).unlink()
    shutil.rmtree(base)
    build_random_model(base, seed=1)
    assert export_run(run, tmp_path / "out").is_dir()  # nothing to compare with
    (run / MODELS_RECORD_FILE).write_text("{not json")
    with pytest.raises(UserError, match=re.escape(f"{run / MODELS_RECORD_FILE}: damaged (JSONDecodeError); delete "
                                                  "it to export the run unchecked")):
        export_run(run, tmp_path / "out2")
