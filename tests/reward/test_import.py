"""`align reward import`: a reward model trained elsewhere (a plain sequence-classification checkpoint,
as TRL's reward trainer saves one) becomes one that align's stages read, normalised on the policy's samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SAMPLES = dict(prompts=6, response_length=6, seed=3)


def _cli(capsys, *args) -> tuple[int, str, str]:
    from align.commands.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["reward", "import", *map(str, args)])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def outside_model(tiny_random_model, tmp_path_factory) -> Path:
    """A reward model as another trainer leaves it: a one-output head, no align files, pad == eos."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("outside") / "rm"
    tokenizer = AutoTokenizer.from_pretrained(tiny_random_model)
    tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_random_model, num_labels=1)
    with torch.no_grad():  # a head that tells responses apart (the checkpoint's fresh one is near zero)
        model.score.weight.normal_(0.0, 1.0)
    model.config.pad_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out



@pytest.fixture(scope="module")
def imported(outside_model, tiny_random_model, rankings_file, tmp_path_factory) -> tuple[Path, dict]:
    from reward.external import import_reward_model

    out = tmp_path_factory.mktemp("imported") / "rm"
    summary = import_reward_model(outside_model, policy=str(tiny_random_model), data=rankings_file, format="kwise",
                                  out=out, batch_size=4, echo=lambda _: None, **SAMPLES)
    return out, summary


def test_the_imported_model_scores_the_policys_samples_at_mean_0_std_1(imported, tiny_random_model, rankings_file):
    from align.generation import generate_responses
    from align.modeling import load_causal_lm, load_tokenizer
    from reward.data import read_source
    from reward.model import load_reward_model, normalization_prompts

    out, summary = imported
    rm = load_reward_model(out, device="cpu")
    prompts = normalization_prompts(read_source("kwise", rankings_file), SAMPLES["prompts"], SAMPLES["seed"])
    tokenizer = load_tokenizer(tiny_random_model)
    samples = generate_responses(load_causal_lm(tiny_random_model, tokenizer=tokenizer), tokenizer, prompts,
                                 max_new_tokens=SAMPLES["response_length"], seed=SAMPLES["seed"])
    raw = rm.score_raw(prompts, [s[0] for s in samples])
    assert raw.std().item() > 1e-3  # the precondition: the samples' raw rewards differ
    assert raw.mean().item() == pytest.approx(summary["reward/raw_mean"], abs=1e-5)  # the samples it was fitted on
    rewards = rm.score(prompts, [s[0] for s in samples])
    assert rewards.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert rewards.std().item() == pytest.approx(1.0, abs=1e-4)
    assert summary["reward/normalization_samples"] == SAMPLES["prompts"]


def test_the_checkpoint_is_kept_as_it_came_its_padding_included(imported, outside_model):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out, _ = imported
    before, after = load_file(outside_model / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(after[name].equal(before[name]) for name in before)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # trained so, read so
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == tokenizer.eos_token_id


def test_each_response_is_read_where_the_model_was_trained_to_read_it(imported, outside_model, rankings_file):
    """As TRL's reward trainer feeds a conversational pair: the whole conversation through the chat
    template, read by the checkpoint's own head one sequence at a time (no padding at all)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from reward.data import read_source
    from reward.model import load_reward_model

    out, _ = imported
    tokenizer = AutoTokenizer.from_pretrained(outside_model)
    model = AutoModelForSequenceClassification.from_pretrained(outside_model).eval()
    assert tokenizer.chat_template and tokenizer.pad_token_id == tokenizer.eos_token_id  # the precondition
    ranking = read_source("kwise", rankings_file)[0]
    expected = []
    for response in ranking.responses:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": ranking.prompt},
                                             {"role": "assistant", "content": response}], return_dict=True,
                                            return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected.append(model(input_ids=ids).logits[0, 0].item())
    assert len({len(r) for r in ranking.responses}) > 1  # one batch, padded: the reads must not move
    got = load_reward_model(out, device="cpu").score_raw([ranking.prompt] * len(ranking.responses), ranking.responses)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)


def test_a_reward_head_that_scores_every_sample_alike_is_warned_of(outside_model, tiny_random_model, rankings_file,
                                                                    tmp_path, caplog):
    import torch
    from transformers import AutoModelForSequenceClassification

    from reward.external import import_reward_model

    untrained = tmp_path / "untrained"  # a head scaled to nothing: the scores differ by rounding alone
    model = AutoModelForSequenceClassification.from_pretrained(outside_model)
    with torch.no_grad():
        model.score.weight.mul_(1e-9)
    model.save_pretrained(untrained)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (untrained / name).write_bytes((outside_model / name).read_bytes())
    warned = lambda: [r.getMessage() for r in caplog.records if "all but alike" in r.getMessage()]  # noqa: E731
    with caplog.at_level("WARNING", logger="align"):
        import_reward_model(untrained, policy=str(tiny_random_model), data=rankings_file, format="kwise",
                            out=tmp_path / "rm", batch_size=4, echo=lambda _: None, **SAMPLES)
        assert len(warned()) == 1 and "samples all but alike (raw mean" in warned()[0]
        import_reward_model(outside_model, policy=str(tiny_random_model), data=rankings_file, format="kwise",
                            out=tmp_path / "rm2", batch_size=4, echo=lambda _: None, **SAMPLES)
        assert len(warned()) == 1  # the trained-like head: nothing said


def test_a_tokenizer_without_pad_gets_one(outside_model, tiny_random_model, rankings_file, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from reward.external import import_reward_model

    source = tmp_path / "no-pad"
    shutil.copytree(outside_model, source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "pad_token_id": None}))
    assert AutoTokenizer.from_pretrained(source).pad_token is None  # the precondition
    import_reward_model(source, policy=str(tiny_random_model), data=rankings_file, format="kwise", out=tmp_path / "rm",
                        prompts=2, response_length=2, echo=lambda _: None)
    imported = AutoTokenizer.from_pretrained(tmp_path / "rm")
    assert imported.pad_token is not None and imported.pad_token_id != imported.eos_token_id
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["pad_token_id"] == imported.pad_token_id


def test_the_accuracy_is_measured_on_every_pair_of_the_rankings(imported, rankings_file):
    from align.formats import ordered_pairs
    from reward.data import read_source

    _, summary = imported
    rankings = read_source("kwise", rankings_file)
    assert summary["eval/num_rankings"] == sum(bool(ordered_pairs(r.ranks)) for r in rankings)
    assert summary["eval/num_pairs"] == sum(len(ordered_pairs(r.ranks)) for r in rankings)
    assert 0.0 <= summary["eval/accuracy"] <= 1.0


def test_an_exported_imported_model_says_it_was_trained_elsewhere(imported, outside_model, tmp_path):
    from align.commands.export import export_run

    out, _ = imported
    card = (export_run(out, tmp_path / "export") / "README.md").read_text(encoding="utf-8")
    assert f"trained elsewhere (`{outside_model.resolve()}`)" in card and "`rendering: conversation`" in card
    assert "held-out" not in card  # align does not know what the model was trained on


def test_what_is_not_a_reward_head_is_refused_in_one_line(tiny_random_model, random_reward_model, outside_model,
                                                          rankings_file, tmp_path, capsys):
    two_outputs = tmp_path / "classifier"
    two_outputs.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (two_outputs / name).write_bytes((outside_model / name).read_bytes())
    config = json.loads((outside_model / "config.json").read_text())
    (two_outputs / "config.json").write_text(json.dumps({**config, "id2label": {"0": "bad", "1": "good"}}))
    mismatched = tmp_path / "mismatched"  # a config.json edited after the weights were saved
    mismatched.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (mismatched / name).write_bytes((outside_model / name).read_bytes())
    (mismatched / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    cases = [
        (tiny_random_model, f"{tiny_random_model} has no reward head (architectures: LlamaForCausalLM)"),
        (two_outputs, f"{two_outputs} has 2 outputs (id2label)"),
        (random_reward_model, f"{random_reward_model} is already a reward model align reads"),
        (mismatched, f"{mismatched}: cannot be loaded (its weights do not match its config.json"),
        (adapter, f"{adapter} is a LoRA adapter: merge it into its base first"),
        (adapter, f"from_pretrained('{adapter}', num_labels=1).merge_and_unload()"),
        (tmp_path / "missing", f"reward model to import not found: {tmp_path / 'missing'}"),
    ]
    for source, expected in cases:
        code, _, err = _cli(capsys, source, "--policy", tiny_random_model, "--data", rankings_file,
                            "--out", tmp_path / "out")
        assert code == 2 and err.startswith("error: ") and expected in err, (source, err)
        assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_an_existing_out_is_never_lost(outside_model, tiny_random_model, random_reward_model, rankings_file,
                                      tmp_path, capsys):
    import shutil

    def contents(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    kept, trained = tmp_path / "kept", tmp_path / "trained-reward-model"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    shutil.copytree(random_reward_model, trained)  # align's own reward model: --force must not take it
    before = {path: contents(path) for path in (kept, trained)}
    common = ("--policy", tiny_random_model, "--data", rankings_file)
    not_import = "is not an earlier `align reward import` and will not be replaced"
    for args, expected in [(("--out", kept), f"{kept} already exists; choose another --out or pass --force"),
                           (("--out", kept, "--force"), f"--out {kept} {not_import}"),
                           (("--out", trained, "--force"), f"--out {trained} {not_import}"),
                           (("--out", outside_model, "--force"), f"--out {outside_model} overlaps the checkpoint")]:
        code, _, err = _cli(capsys, outside_model, *common, *args)
        assert code == 2 and err.startswith(f"error: {expected}"), err
    assert {path: contents(path) for path in (kept, trained)} == before and before[kept] == {"notes.txt": b"mine"}
    assert not any(outside_model.glob("reward_*.json"))


def test_an_earlier_import_is_replaced_with_force(imported, outside_model, tiny_random_model, rankings_file, tmp_path):
    import shutil

    from reward.external import import_reward_model

    again = tmp_path / "again"
    shutil.copytree(imported[0], again)
    summary = import_reward_model(outside_model, policy=str(tiny_random_model), data=rankings_file, format="kwise",
                                  out=again, force=True, prompts=3, response_length=2, echo=lambda _: None)
    assert summary["reward/normalization_samples"] == 3
    assert json.loads((again / "reward_model_info.json").read_text())["summary"]["reward/normalization_samples"] == 3


def test_rankings_of_one_prompt_cannot_normalise(outside_model, tiny_random_model, tmp_path, capsys):
    from align.exports import write_kwise
    from align.formats import Ranking

    one = tmp_path / "one.jsonl"
    write_kwise([Ranking(prompt="hi", responses=["a", "b"], ranks=[0, 1])] * 2, one)
    code, _, err = _cli(capsys, outside_model, "--policy", tiny_random_model, "--data", one, "--out", tmp_path / "o")
    assert code == 2 and err == f"error: {one}: 1 distinct prompt; the normalisation needs the policy's answers to " \
                                "at least 2\n"
    assert not (tmp_path / "o").exists()


def test_an_outside_checkpoint_given_as_a_reward_model_points_to_import(outside_model):
    from align.errors import UserError
    from reward.run_dir import model_dir

    with pytest.raises(UserError, match=f"align reward import {outside_model} --policy SFT --data RANKINGS"):
        model_dir(outside_model)


def test_a_run_on_another_policy_than_the_normalisations_is_told(imported, tiny_random_model, outside_model):
    from reward.run_dir import normalised_elsewhere

    out, _ = imported
    assert normalised_elsewhere(out, tiny_random_model) is None
    note = normalised_elsewhere(out, outside_model)  # any other checkpoint
    assert note and f"normalised on samples of {tiny_random_model.resolve()}, not of this run's policy" in note


def test_an_imported_model_can_be_the_critic_of_a_policy_without_a_pad_token(tmp_path):
    """A Llama-3-style SFT tokenizer has no pad token (align adds <pad> to the policy's); the reward
    model TRL trained from it pads with eos and is imported so. value_model=reward_model still builds."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    from align.exports import write_kwise
    from align.modeling import load_tokenizer
    from align.synthetic import make_rankings
    from ppo.model import build_critic
    from reward.external import import_reward_model
    from reward.model import load_reward_model

    rankings = make_rankings(12, k=3, seed=1)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(), decoders.ByteLevel()
    bpe.train_from_iterator([r.prompt + " " + " ".join(r.responses) for r in rankings], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
                               "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    tokenizer.pad_token = tokenizer.eos_token  # TRL's reward trainer: pad = eos
    LlamaForSequenceClassification(LlamaConfig(**{**config.to_dict(), "num_labels": 1, "pad_token_id": 2,
                                                  "architectures": ["LlamaForSequenceClassification"]})
                                   ).save_pretrained(tmp_path / "outside")
    tokenizer.save_pretrained(tmp_path / "outside")
    write_kwise(rankings, tmp_path / "rankings.jsonl")
    import_reward_model(tmp_path / "outside", policy=str(tmp_path / "sft"), data=tmp_path / "rankings.jsonl",
                        format="kwise", out=tmp_path / "rm", prompts=4, response_length=4, echo=lambda _: None)
    reward_model, policy_tokenizer = load_reward_model(tmp_path / "rm", device="cpu"), load_tokenizer(tmp_path / "sft")
    assert "<pad>" in policy_tokenizer.get_vocab() and "<pad>" not in reward_model.tokenizer.get_vocab()
    critic = build_critic(reward_model, policy_tokenizer, len(policy_tokenizer))
    assert critic.trunk.get_input_embeddings().num_embeddings == len(policy_tokenizer)  # the <pad> row, grown
