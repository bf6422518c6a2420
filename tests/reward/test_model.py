"""LoRA keeps the base frozen; full fine-tuning moves it; the reward is read at the last real token;
a saved model loads back with identical, normalised scores."""

import json

import pytest
import torch

from reward.train import RewardTrainer, train_reward_model


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def trained(cfg):
    trainer = RewardTrainer(cfg, echo=lambda s: None)
    trainer.setup()
    before = snapshot(trainer.model)
    trainer.train()
    return trainer, before, snapshot(trainer.model)


def test_lora_freezes_the_base_and_trains_adapter_and_head(quick_config):
    trainer, before, after = trained(quick_config("lora.enabled=true", "lora.r=4", "train.learning_rate=1e-2"))
    lora_names = [n for n in before if "lora_" in n]
    head_names = [n for n in before if "modules_to_save" in n and "score" in n]
    base_names = [n for n in before if "lora_" not in n and "modules_to_save" not in n]
    assert lora_names and head_names and base_names
    assert all(torch.equal(before[n], after[n]) for n in base_names), "a base weight changed under LoRA"
    assert any(not torch.equal(before[n], after[n]) for n in lora_names if "lora_B" in n)
    assert all(not torch.equal(before[n], after[n]) for n in head_names)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_names) | set(head_names)


def test_full_finetuning_changes_base_weights(quick_config):
    _, before, after = trained(quick_config("lora.enabled=false"))
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert "score.weight" in changed
    assert any(n.startswith("model.layers.0.") for n in changed)
    assert any("embed_tokens" in n for n in changed)


def test_freeze_embeddings_trains_every_layer_but_not_the_embeddings(quick_config):
    trainer, before, after = trained(quick_config("lora.enabled=false", "model.freeze_embeddings=true"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    embeddings = {n for n in before if "embed_tokens" in n}
    assert embeddings and not embeddings & changed
    assert "score.weight" in changed and any(n.startswith("model.layers.0.") for n in changed)


def test_head_init_and_reward_at_last_real_token(tiny_random_model):
    from align.modeling import load_tokenizer
    from reward.model import build_reward_model, encode, forward_rewards

    tok = load_tokenizer(tiny_random_model)
    model = build_reward_model(tiny_random_model, tok, seed=0).eval()
    d = model.config.hidden_size
    assert model.score.weight.std().item() == pytest.approx(1 / (d + 1) ** 0.5, rel=0.35)
    texts = ["<|user|>\nhi\n<|assistant|>\nhello</s>", "<|user|>\na longer prompt here\n<|assistant|>\na much longer reply</s>"]
    with torch.no_grad():
        alone = torch.cat([forward_rewards(model, **encode(tok, [t], 64)) for t in texts])
        batched = forward_rewards(model, **encode(tok, texts, 64))  # the first is padded on the right
    assert torch.allclose(alone, batched, atol=1e-5)
    # the reward depends on the final eos (the last real token), so it is not the pad position's value
    with torch.no_grad():
        no_eos = forward_rewards(model, **encode(tok, [texts[0][: -len("</s>")]], 64))
    assert not torch.allclose(no_eos, alone[:1])


@pytest.mark.parametrize("lora", [False, True])
def test_save_load_round_trip_scores_identically_and_normalised(quick_config, lora):
    from align.synthetic import make_rankings
    from reward.model import load_reward_model

    cfg = quick_config(f"lora.enabled={str(lora).lower()}", "lora.r=4", "train.learning_rate=1e-2")
    summary = train_reward_model(cfg, echo=lambda s: None)
    run = cfg.output_dir
    rm = load_reward_model(run)
    norm = json.loads((rm.path / "reward_normalization.json").read_text())
    assert rm.gain == norm["gain"] == summary["reward/gain"] and rm.bias == norm["bias"]
    assert rm.gain != 1.0 and rm.bias != 0.0  # fitted on the SFT model's samples
    assert (rm.path / "adapter_config.json").exists() == lora
    info = json.loads((rm.path / "reward_model_info.json").read_text())
    assert info["data"]["format"] == "synthetic" and info["config"]["lora"]["enabled"] == lora

    r = make_rankings(6, k=2, seed=9, split="heldout")
    prompts = [x.prompt for x in r for _ in x.responses]
    responses = [y for x in r for y in x.responses]
    raw = rm.score_raw(prompts, responses)
    assert torch.allclose(rm.score(prompts, responses), rm.gain * raw + rm.bias)
    again = load_reward_model(run + "/model")
    assert torch.equal(again.score(prompts, responses), rm.score(prompts, responses))
    # the trainer's own (unmerged) model gave the same held-out accuracy as the reloaded one
    from reward.data import load_reward_data
    from reward.evaluate import evaluate_rankings

    data = load_reward_data(cfg.data)
    metrics = evaluate_rankings(rm.model, rm.tokenizer, data.eval, max_length=cfg.model.max_length, batch_size=64,
                                gain=rm.gain)
    assert metrics["eval/accuracy"] == pytest.approx(summary["eval/accuracy"], abs=1e-6)
    # the held-out loss is of the raw rewards, as the training loss is; the margin is normalised
    raw_metrics = evaluate_rankings(rm.model, rm.tokenizer, data.eval, max_length=cfg.model.max_length, batch_size=64)
    assert abs(rm.gain - 1) > 0.05  # the precondition: the normalisation rescales
    assert metrics["eval/loss"] == pytest.approx(raw_metrics["eval/loss"], abs=1e-6)
    assert summary["eval/loss"] == pytest.approx(raw_metrics["eval/loss"], abs=1e-5)
    assert metrics["eval/reward_margin"] == pytest.approx(rm.gain * raw_metrics["eval/reward_margin"], rel=1e-5)


def test_train_layers_freezes_everything_below_the_top_layers(quick_config):
    trainer, before, after = trained(quick_config("model.train_layers=1"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert "score.weight" in changed and "model.norm.weight" in changed
    assert any(n.startswith("model.layers.1.") for n in changed)  # the tiny model has 2 layers
    assert not any(n.startswith(("model.layers.0.", "model.embed_tokens")) for n in changed)


def test_train_layers_with_lora_puts_adapters_on_top_layers_only(quick_config):
    trainer, before, after = trained(quick_config("model.train_layers=1", "lora.enabled=true", "lora.r=4"))
    lora_names = [n for n in before if "lora_" in n]
    assert lora_names and all(".layers.1." in n for n in lora_names)


@pytest.mark.parametrize(("lora", "attn"), [(False, "sdpa"), (True, "sdpa"), (False, "eager")])
def test_shared_prompt_forward_equals_whole_sequences(tiny_random_model, lora, attn):
    """Prompts encoded once, responses continued from their cache: the same rewards and gradients
    as forwarding every prompt + response whole, with mismatched pairs and a truncated prompt."""
    from align.config import load_config
    from align.modeling import load_tokenizer
    from align.synthetic import make_rankings
    from reward.config import RewardConfig
    from reward.data import RankingCollator, RankingDataset
    from reward.model import build_reward_model, forward_rewards, forward_rewards_shared_prompts

    tok = load_tokenizer(tiny_random_model)
    lora_cfg = load_config(RewardConfig, None, ["lora.enabled=true", "lora.r=4"]).lora if lora else None
    model = build_reward_model(tiny_random_model, tok, lora=lora_cfg, seed=0, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    if attn == "sdpa":  # float64: the two paths sum in different orders (transformers' eager masks give NaN in float64)
        model.double()
    if lora:  # a non-zero adapter, so that it takes part in both forwards
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    rankings = make_rankings(6, k=4, seed=3)
    dataset = RankingDataset(rankings, tok, max_length=256)
    long_len = max(len(s) for s in dataset[0].responses)
    truncated = RankingDataset(rankings[:1], tok, max_length=long_len - 4)  # left truncation cuts the prompt
    assert truncated[0].prompt_len == 0 and dataset[0].prompt_len > 0
    collate = RankingCollator(tok.pad_token_id, mismatch=True)
    batch = collate([*dataset.items, truncated[0]])
    assert batch.mismatch_losers.numel() == len(rankings)  # all but the truncated one
    assert batch.prompt_ids.shape[0] < batch.num_responses  # prompts are shared
    input_ids, attention_mask = batch.whole_sequences(tok.pad_token_id)
    assert batch.continuation_ids.shape[1] < input_ids.shape[1]

    def rewards_and_grads(forward):
        model.zero_grad()
        rewards = forward()
        (rewards * torch.linspace(-1, 1, len(rewards), dtype=rewards.dtype)).sum().backward()
        return rewards.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    whole, whole_grads = rewards_and_grads(lambda: forward_rewards(model, input_ids, attention_mask))
    shared, shared_grads = rewards_and_grads(lambda: forward_rewards_shared_prompts(model, batch, 2))
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-4)
    assert whole_grads.keys() == shared_grads.keys() and whole_grads
    for name, expected in whole_grads.items():
        torch.testing.assert_close(shared_grads[name], expected, atol=1e-5, rtol=1e-3, msg=lambda m, name=name: f"{name}: {m}")


def test_a_damaged_reward_model_is_one_line(random_reward_model, tmp_path):
    import shutil

    from align.errors import UserError
    from reward.model import load_reward_model

    broken = tmp_path / "model"
    shutil.copytree(random_reward_model, broken)
    (broken / "reward_normalization.json").write_text("{gain")
    with pytest.raises(UserError, match="reward_normalization.json: damaged"):
        load_reward_model(broken, device="cpu")
    shutil.copy2(random_reward_model / "reward_normalization.json", broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(UserError, match="no model weights"):
        load_reward_model(broken, device="cpu")


def test_dropout_is_off_in_train_mode_including_the_attention_rate_kept_as_a_number():
    # Llama (as Qwen2, Mistral, Gemma) keeps attention dropout as a float it applies in train mode,
    # not as an nn.Dropout: a reward model trained in train mode must give one reward per text
    from transformers import LlamaConfig, LlamaModel

    from reward.model import disable_dropout

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, attention_dropout=0.5, attn_implementation="eager")
    model = LlamaModel(config).train()
    ids = torch.randint(0, 64, (2, 12))
    assert not torch.equal(model(ids).last_hidden_state, model(ids).last_hidden_state)  # the precondition
    disable_dropout(model)
    torch.testing.assert_close(model(ids).last_hidden_state, model(ids).last_hidden_state, rtol=0, atol=0)
    assert model.config.attention_dropout == 0.0


def test_a_lora_reward_model_moved_with_its_base_loads_from_any_working_directory(quick_config, tmp_path,
                                                                                 tiny_random_model, monkeypatch):
    # its adapter_config.json names the base relative to the adapter ("../base"), as the policy's may
    import shutil

    from align.errors import UserError
    from reward.model import load_reward_model

    cfg = quick_config(f"output_dir={tmp_path / 'run'}", "lora.enabled=true", "lora.r=4", "train.max_steps=1",
                       "eval.normalize=false")
    train_reward_model(cfg, echo=lambda s: None)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_random_model, moved / "base")
    shutil.copytree(tmp_path / "run" / "model", moved / "reward")
    config_file = moved / "reward" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "../base"}))
    monkeypatch.chdir(tmp_path)  # where "../base" names nothing
    scores = load_reward_model(moved / "reward").score(["hi"], ["hello"])
    assert scores.shape == (1,)
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": "../nowhere"}))
    with pytest.raises(UserError, match="its base checkpoint cannot be loaded .*model not found"):
        load_reward_model(moved / "reward")


def test_a_sharded_reward_model_frees_its_root_unit_after_scoring(random_reward_model, tmp_path):
    # FSDP2 keeps a root unit gathered from its forward until the backward; a reward model that only
    # scores never runs one, and PPO's would hold its embedding whole all run (one gloo rank here: a
    # gathered parameter is a plain tensor, a sharded one a DTensor)
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from align.distributed import shard
    from reward.model import load_reward_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        scorer = load_reward_model(random_reward_model)
        plugin = SimpleNamespace(mixed_precision_policy=None, cpu_offload=None, transformer_cls_names_to_wrap=None,
                                 reshard_after_forward=True)
        shard(scorer.model, plugin)
        embedding = scorer.model.get_input_embeddings()
        assert isinstance(embedding.weight, DTensor)
        scores = scorer.score(["a prompt", "another"], ["one answer", "two"])
        assert scores.shape == (2,) and torch.isfinite(scores).all()
        assert isinstance(embedding.weight, DTensor)
    finally:
        dist.destroy_process_group()


def test_a_reward_model_with_damaged_weights_is_one_line_naming_it(random_reward_model, tmp_path):
    import shutil

    from align.errors import UserError
    from reward.model import load_reward_model

    copy = shutil.copytree(random_reward_model, tmp_path / "model")
    weights = next(copy.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(UserError, match=rf"{copy}: damaged or truncated weights \("):
        load_reward_model(copy)


def test_fit_normalization_gives_mean_0_and_std_1():
    from reward.model import fit_normalization

    # raw 1, 2, 3, 10: mean 4, squared deviations 9 + 4 + 1 + 36 = 50, sample std (n - 1, torch's
    # default) sqrt(50 / 3): gain sqrt(3 / 50), bias -4 * gain
    raw = torch.tensor([1.0, 2.0, 3.0, 10.0])
    gain, bias = fit_normalization(raw)
    assert gain == pytest.approx((3 / 50) ** 0.5) and bias == pytest.approx(-4 * (3 / 50) ** 0.5)
    z = gain * raw + bias
    assert z.mean().item() == pytest.approx(0.0, abs=1e-6) and z.std().item() == pytest.approx(1.0, rel=1e-6)
    # no spread: nothing to scale (gain 1), only shifted to 0
    gain, bias = fit_normalization(torch.full((3,), 5.0))
    assert gain == 1.0 and bias == -5.0
    assert torch.equal(gain * torch.full((3,), 5.0) + bias, torch.zeros(3))


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_a_reward_is_the_same_alone_and_batched_with_longer_texts(family, tmp_path):
    # GPT-2 learns absolute positions counted from the first column: padding on the left would move a short
    # text's tokens (Llama's rotary positions are relative, OPT counts its positions from the attention mask)
    from align.modeling import load_tokenizer
    from reward.model import build_reward_model, encode, forward_rewards
    from tests.families.builders import build_family_model

    path = build_family_model(family, tmp_path / family)
    tok = load_tokenizer(path)
    model = build_reward_model(path, tok, seed=0).eval()
    texts = ["<|user|>\nhi\n<|assistant|>\nhello</s>",
             "<|user|>\na much longer prompt than the first one\n<|assistant|>\na much longer reply with many words</s>"]
    short, long = (len(encode(tok, [t], 64)["input_ids"][0]) for t in texts)
    assert long > short + 8  # the short text is padded in the batch
    with torch.no_grad():
        alone = torch.cat([forward_rewards(model, **encode(tok, [t], 64)) for t in texts])
        batched = forward_rewards(model, **encode(tok, texts, 64))
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


def test_a_saved_reward_model_keeps_its_max_length(quick_config, tmp_path):
    from reward.model import encode, forward_rewards, load_reward_model, render_texts

    cfg = quick_config(f"output_dir={tmp_path / 'short'}", "model.max_length=48", "train.max_steps=1",
                       "eval.normalize=false", "data.num_rankings=16", "data.num_eval_rankings=8")
    train_reward_model(cfg, echo=lambda s: None)
    rm = load_reward_model(tmp_path / "short", device="cpu")
    assert rm.max_length == 48
    # it scores a longer text as it trained on it: cut to its last 48 tokens
    prompt, response = "a long prompt " * 30, "the reply"
    text = render_texts(rm.tokenizer, [prompt], [response])
    assert len(rm.tokenizer(text[0], add_special_tokens=False)["input_ids"]) > 60
    with torch.no_grad():
        cut = forward_rewards(rm.model, **encode(rm.tokenizer, text, 48))
    torch.testing.assert_close(rm.score_raw([prompt], [response]), cut, atol=1e-5, rtol=0)


def test_a_lora_adapter_as_the_reward_base_is_refused_with_a_merge_that_works(tiny_random_model, tmp_path):
    # the hint named `align export ADAPTER`, which exports align's runs only; the one it gives now runs
    import re
    import subprocess
    import sys

    from align.errors import UserError
    from align.modeling import load_causal_lm, load_tokenizer
    from reward.model import build_reward_model
    from tests.adapters import save_random_adapter

    adapter = save_random_adapter(tiny_random_model, tmp_path / "sft", load_tokenizer(tiny_random_model), seed=1)
    with pytest.raises(UserError, match=rf"sft is a LoRA adapter, not a checkpoint: give its base \({tiny_random_model}\)"
                       ) as refused:
        build_reward_model(adapter, load_tokenizer(adapter))
    merge = re.search(r'python -c "(.*)"$', str(refused.value)).group(1).replace("DIR", str(tmp_path / "merged"))
    subprocess.run([sys.executable, "-c", merge], check=True, capture_output=True)
    merged = tmp_path / "merged"
    build_reward_model(merged, load_tokenizer(merged))
    ids = torch.tensor([[1, 5, 9, 12, 40, 7]])
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(merged)(ids).logits, load_causal_lm(adapter)(ids).logits)
