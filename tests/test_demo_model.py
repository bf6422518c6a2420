"""The locally built models load offline as ordinary Hugging Face checkpoints."""

from __future__ import annotations

import re
import statistics

import pytest
import torch
from safetensors.torch import load_file

from align.chat import render_example, render_prompt
from align.demo_model import build_random_model
from align.errors import UserError
from align.generation import generate_responses
from align.modeling import load_causal_lm, load_tokenizer, resolve_model_path
from align.synthetic import TOPICS, gold_score, make_prompts


def test_checkpoint_loads_with_plain_transformers(tiny_random_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (tiny_random_model / name).exists(), name
    model = AutoModelForCausalLM.from_pretrained(tiny_random_model, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_random_model, local_files_only=True)
    assert model.config.model_type == "llama"
    ids = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert len(ids) == 3 and None not in ids  # pad, bos and eos are distinct tokens
    assert model.config.vocab_size == len(tokenizer)


def test_chat_template_round_trip(tiny_random_model):
    tokenizer = load_tokenizer(tiny_random_model)
    prompt = render_prompt(tokenizer, "Tell me about tea.")
    assert prompt == "<s><|user|>\nTell me about tea.\n<|assistant|>\n"
    full = render_example(tokenizer, "Tell me about tea.", "Boil water.")
    assert full == prompt + "Boil water.</s>"
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True).strip().endswith("Boil water.")


def test_same_seed_same_model(tmp_path):
    a = build_random_model(tmp_path / "a", seed=3)
    b = build_random_model(tmp_path / "b", seed=3)
    c = build_random_model(tmp_path / "c", seed=4)
    wa, wb, wc = (load_file(p / "model.safetensors") for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_generation_returns_k_samples_per_prompt(tiny_random_model):
    tokenizer = load_tokenizer(tiny_random_model)
    model = load_causal_lm(tiny_random_model, tokenizer=tokenizer)
    out = generate_responses(model, tokenizer, ["Tell me about tea.", "How does chess work?"],
                             num_return_sequences=3, max_new_tokens=6, seed=1)
    assert [len(x) for x in out] == [3, 3]
    again = generate_responses(model, tokenizer, ["Tell me about tea.", "How does chess work?"],
                               num_return_sequences=3, max_new_tokens=6, seed=1)
    assert out == again  # seeded


def test_seeded_sampling_draws_the_same_and_leaves_the_callers_generator_alone(tiny_random_model):
    tokenizer = load_tokenizer(tiny_random_model)
    model = load_causal_lm(tiny_random_model, tokenizer=tokenizer)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    first = generate_responses(model, tokenizer, ["Hi", "Why?"], max_new_tokens=6, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(7)  # another caller's state: the same seed still draws the same samples
    assert generate_responses(model, tokenizer, ["Hi", "Why?"], max_new_tokens=6, seed=3) == first


def test_unknown_model_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="model not found"):
        resolve_model_path(tmp_path / "missing")
    with pytest.raises(UserError, match="not a model checkpoint"):
        resolve_model_path(tmp_path)
    with pytest.raises(UserError, match="unknown demo model size"):
        resolve_model_path("demo:huge")


def test_lora_adapter_checkpoint_is_merged(tiny_random_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    tokenizer = load_tokenizer(tiny_random_model)
    base = load_causal_lm(tiny_random_model, tokenizer=tokenizer)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        expected = peft_model(ids).logits
        merged = load_causal_lm(tmp_path / "adapter", tokenizer=tokenizer)
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
        assert not hasattr(merged, "peft_config")



def _vocabulary() -> set[str]:
    from align.synthetic import FILLER, NEUTRAL_CLOSERS, POLITE_CLOSERS, POLITE_OPENERS, RUDE_INSERTS, RUDE_OPENERS, TRAIL_OFFS

    text = " ".join([f for t in TOPICS for f in t.facts] + list(FILLER + POLITE_CLOSERS + NEUTRAL_CLOSERS
                    + POLITE_OPENERS + RUDE_INSERTS + RUDE_OPENERS + TRAIL_OFFS))
    return set(re.findall(r"[a-z']+", text.lower()))


@pytest.mark.slow
def test_demo_model_samples_are_english_and_span_the_gold_range(demo_model):
    tokenizer = load_tokenizer(demo_model)
    model = load_causal_lm(demo_model, tokenizer=tokenizer)
    prompts = make_prompts(60, seed=5, split="heldout")
    samples = [s[0] for s in generate_responses(model, tokenizer, prompts, max_new_tokens=64, seed=5)]
    vocabulary = _vocabulary()
    words = [w for s in samples for w in re.findall(r"[a-z']+", s.lower())]
    assert len(words) > 300
    assert sum(w in vocabulary for w in words) / len(words) > 0.95  # real words from the corpus
    scores = [gold_score(p, s) for p, s in zip(prompts, samples)]
    assert statistics.pstdev(scores) > 1.5  # room for the reward model and PPO to improve


def test_supervised_finetune_is_deterministic_and_learns(tiny_random_model):
    from dataclasses import replace

    from align.demo_model import SIZES, init_model, supervised_finetune

    size = replace(SIZES["test"], sft_steps=12, sft_batch_size=8, sft_lr=3e-3)
    tokenizer = load_tokenizer(tiny_random_model)
    runs = []
    for _ in range(2):
        model = init_model(tokenizer, size, seed=7)
        losses = supervised_finetune(model, tokenizer, size, seed=7, progress=False)
        runs.append((losses, {k: v.clone() for k, v in model.state_dict().items()}))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert losses_a == losses_b and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert statistics.fmean(losses_a[-3:]) < statistics.fmean(losses_a[:3])  # it learns


def test_demo_model_is_built_once_into_the_cache(monkeypatch, tmp_path):
    from align.demo_model import ensure_demo_model

    monkeypatch.setenv("ALIGN_CACHE_DIR", str(tmp_path / "cache"))
    first = ensure_demo_model("test")
    assert first.parent == tmp_path / "cache"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_model("test") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt


@pytest.fixture
def no_sft(monkeypatch):
    """The demo build without its minutes of SFT: a wrongful build is then quick to see."""
    import align.demo_model as demo

    monkeypatch.setattr(demo, "supervised_finetune", lambda *args, **kwargs: [])


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_an_existing_output_that_is_not_a_checkpoint_is_refused_without_force(no_sft, tmp_path, kind):
    from align.demo_model import build_demo_model, is_complete

    out = tmp_path / "keep"
    if kind == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out.write_text("mine")
    with pytest.raises(UserError, match=r"already exists and is not a demo checkpoint.*--force"):
        build_demo_model(out, size="tiny", progress=False)
    # nor with --force: `--out . --force` or `--out ~ --force` would have replaced a working folder or a home
    with pytest.raises(UserError, match=r"is neither a demo checkpoint nor an empty folder and will not be replaced"):
        build_demo_model(out, size="tiny", force=True, progress=False)
    assert (out / "notes.txt" if kind == "folder" else out).read_text() == "mine"  # untouched
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_demo_model(empty, size="tiny", force=True, progress=False) == empty  # an empty folder is taken
    assert is_complete(empty)


def test_a_checkpoint_of_another_size_or_seed_is_refused_without_force(no_sft, tmp_path):
    # it was kept with "already holds a checkpoint", and the CLI then said the model asked for was ready
    import subprocess
    import sys

    from align.demo_model import build_demo_model, is_complete

    out = tmp_path / "model"
    build_demo_model(out, size="tiny", seed=0, progress=False)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(out, size="tiny", seed=0, progress=False) == out  # the same one: reused
    for size, seed in [("small", 7), ("small", 0), ("tiny", 7)]:
        with pytest.raises(UserError, match=rf"^{out} holds the tiny demo model of seed 0, not the {size} one of "
                                            rf"seed {seed} asked for; choose another --out or pass --force"):
            build_demo_model(out, size=size, seed=seed, progress=False)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    result = subprocess.run([sys.executable, "-m", "align", "init-demo-model", "--out", str(out), "--size", "small",
                             "--seed", "7"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "ready" not in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"error: {out} holds the tiny demo model of seed 0, not the small one of seed 7 asked for; choose another "
        "--out or pass --force to rebuild it"]
    assert build_demo_model(out, size="small", seed=7, force=True, progress=False) == out  # --force rebuilds
    from align.demo_model import RECIPE_VERSION, RECORD_FILE, built_as

    assert built_as(out) == ("small", 7, RECIPE_VERSION)
    (out / RECORD_FILE).unlink()  # a checkpoint that does not say what it is
    with pytest.raises(UserError, match=rf"^{out} holds a checkpoint with no record of its demo size and seed "
                                        r".*will not be replaced, even with --force"):
        build_demo_model(out, size="small", seed=7, progress=False)
    with pytest.raises(UserError, match=r"will not be replaced, even with --force"):  # perhaps a user's own model
        build_demo_model(out, size="small", seed=7, force=True, progress=False)
    assert is_complete(out)


def test_a_checkpoint_of_an_older_recipe_is_refused_without_force(no_sft, tmp_path, monkeypatch):
    # it was kept as "the tiny demo model of seed 0": built_as compared size and seed only
    import json
    import subprocess
    import sys

    from align.demo_model import RECIPE_VERSION, RECORD_FILE, build_demo_model, built_as, demo_model_dir

    out = tmp_path / "model"
    build_demo_model(out, size="tiny", seed=0, progress=False)
    record = json.loads((out / RECORD_FILE).read_text())
    (out / RECORD_FILE).write_text(json.dumps({**record, "recipe_version": RECIPE_VERSION - 1}))
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    refusal = (f"{out} holds the tiny demo model of seed 0 built by an older recipe (version {RECIPE_VERSION - 1}; "
               f"this align builds version {RECIPE_VERSION}); choose another --out or pass --force to rebuild it")
    with pytest.raises(UserError, match=f"^{re.escape(refusal)}$"):
        build_demo_model(out, size="tiny", seed=0, progress=False)
    assert built_as(out) == ("tiny", 0, RECIPE_VERSION - 1)
    result = subprocess.run([sys.executable, "-m", "align", "init-demo-model", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "ready" not in result.stdout
    assert result.stderr.strip().splitlines() == [f"error: {refusal}"]
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # untouched
    (out / RECORD_FILE).write_text(json.dumps({"size": "tiny", "seed": 0}))  # a record that names no version
    with pytest.raises(UserError, match=r"built by an older recipe \(its record names no version; this align builds"):
        build_demo_model(out, size="tiny", seed=0, progress=False)
    assert build_demo_model(out, size="tiny", seed=0, force=True, progress=False) == out  # --force rebuilds
    assert built_as(out) == ("tiny", 0, RECIPE_VERSION)
    assert build_demo_model(out, size="tiny", seed=0, progress=False) == out  # and it is then kept
    # align's cache folder, keyed by the recipe version, is kept with or without a record
    monkeypatch.setenv("ALIGN_CACHE_DIR", str(tmp_path / "cache"))
    cached = build_demo_model(demo_model_dir("tiny", 0), size="tiny", seed=0, progress=False)
    assert cached.name.endswith(f"-v{RECIPE_VERSION}") and built_as(cached) == ("tiny", 0, RECIPE_VERSION)
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(cached, size="tiny", seed=0, progress=False) == cached
    (cached / RECORD_FILE).unlink()
    assert build_demo_model(cached, size="tiny", seed=0, progress=False) == cached
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_cache_folder_is_reused_for_its_own_size_and_seed(monkeypatch, tmp_path, tiny_random_model):
    # a cached model built before the record was written: its folder's name says what it is
    import shutil
    import subprocess
    import sys

    from align.demo_model import RECORD_FILE, demo_model_dir

    monkeypatch.setenv("ALIGN_CACHE_DIR", str(tmp_path / "cache"))
    cached = demo_model_dir("tiny", 0)
    shutil.copytree(tiny_random_model, cached)
    (cached / RECORD_FILE).unlink()
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    result = subprocess.run([sys.executable, "-m", "align", "init-demo-model"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == f"demo model (tiny) ready at {cached}", result.stderr
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp


def test_cli_refuses_an_existing_folder_in_one_line(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "keep"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "align", "init-demo-model", "--size", "tiny", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--force" in result.stderr and "Traceback" not in result.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_a_built_model_is_readable_as_a_plain_mkdir_and_open_would_leave_it(tmp_path, umask):
    from tests.conftest import modes

    umask(0o022)
    found = modes(build_random_model(tmp_path / "model"))
    assert "model.safetensors" in found and found == {name: 0o755 if name == "." else 0o644 for name in found}


def test_only_the_sizes_the_help_names_are_built(no_sft, tmp_path):
    from align.demo_model import build_demo_model

    with pytest.raises(UserError, match="unknown demo model size 'test'; choose tiny or small"):
        build_demo_model(tmp_path / "t", size="test", progress=False)
    assert not (tmp_path / "t").exists()
    with pytest.raises(UserError, match="unknown demo model size 'test'"):
        resolve_model_path("demo:test")


def test_sampling_ignores_the_checkpoints_generation_settings(tiny_random_model, tmp_path):
    import shutil

    from transformers import GenerationConfig

    prompts, kwargs = ["Tell me about tea.", "How does chess work?"], {"max_new_tokens": 12, "seed": 4,
                                                                       "num_return_sequences": 3}
    tokenizer = load_tokenizer(tiny_random_model)
    plain = generate_responses(load_causal_lm(tiny_random_model, tokenizer=tokenizer), tokenizer, prompts, **kwargs)
    shipped = tmp_path / "shipped"  # as Qwen2.5-Instruct ships repetition_penalty 1.1 (here far stronger)
    shutil.copytree(tiny_random_model, shipped)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, do_sample=True, repetition_penalty=5.0, top_k=1,
                     no_repeat_ngram_size=1, min_new_tokens=12).save_pretrained(shipped)
    model = load_causal_lm(shipped, tokenizer=tokenizer)
    assert model.generation_config.repetition_penalty == 5.0
    greedy_like = model.generate(**tokenizer(["Hi"], return_tensors="pt"), max_new_tokens=12)  # the settings act
    assert len(set(greedy_like[0, -12:].tolist())) == 12  # no token repeats under no_repeat_ngram_size=1
    assert generate_responses(model, tokenizer, prompts, **kwargs) == plain
    assert model.generation_config.repetition_penalty == 5.0  # the model's own settings are left as they were


def test_force_on_a_link_says_it_is_a_link(no_sft, tmp_path):
    # the replacement would take the link's place: said as such, not as "not a demo checkpoint"
    from align.demo_model import build_demo_model, built_as

    target = build_demo_model(tmp_path / "model", size="tiny", seed=0, progress=False)
    link = tmp_path / "latest"
    link.symlink_to(target)
    with pytest.raises(UserError, match=rf"^--out {link} is a symbolic link \(to {target}\); give the folder's own path"):
        build_demo_model(link, size="small", seed=0, force=True, progress=False)
    assert link.is_symlink() and built_as(target)[:2] == ("tiny", 0)
