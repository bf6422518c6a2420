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
    trainer, before, after = trained(quick_config("lora.enabled=true", "lora.r=4", "train.lr=1e-2"))
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

    cfg = quick_config(f"lora.enabled={str(lora).lower()}", "lora.r=4", "train.lr=1e-2")
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
    from reward.evaluate import evaluate_rankings
    from reward.data import load_reward_data

    data = load_reward_data(cfg.data)
    metrics = evaluate_rankings(rm.model, rm.tokenizer, data.eval, max_length=cfg.model.max_length, batch_size=64,
                                gain=rm.gain, bias=rm.bias)
    assert metrics["eval/accuracy"] == pytest.approx(summary["eval/accuracy"], abs=1e-6)


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
