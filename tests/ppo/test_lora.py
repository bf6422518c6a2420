"""Policy = SFT + LoRA: the SFT weights never move; only adapter and value head learn."""

from __future__ import annotations

import json

import torch

from align.config import load_config
from ppo.config import PPOConfig
from ppo.data import gold_judge
from ppo.trainer import PPOTrainer


def test_base_weights_bit_identical_only_adapter_and_value_head_change(small_run, ppo_policy_path):
    from safetensors.torch import load_file

    cfg = load_config(PPOConfig, None, small_run)
    trainer = PPOTrainer(cfg, judge=gold_judge(cfg.eval_prompts))
    trainer.setup()
    frozen_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable_before and all("lora_" in n or n.startswith("value_head.") for n in trainable_before)
    assert all("lora_" not in n for n in frozen_before)

    summary = trainer.train()

    after = dict(trainer.model.named_parameters())
    for name, before in frozen_before.items():
        assert torch.equal(after[name], before), f"frozen weight {name} changed"
    changed = {n for n, before in trainable_before.items() if not torch.equal(after[n], before)}
    assert any(n.startswith("value_head.") for n in changed), "the value head did not learn"
    assert any("lora_B" in n for n in changed), "the LoRA adapter did not learn"

    # The base weights also equal the SFT checkpoint on disk, bit for bit.
    on_disk = load_file(str(ppo_policy_path / "model.safetensors"))
    base = {n.replace(".base_layer", ""): p for n, p in trainer.model.policy.get_base_model().named_parameters()
            if "lora_" not in n}
    assert set(on_disk) <= set(base)
    for name, tensor in on_disk.items():
        assert torch.equal(base[name], tensor), f"{name} differs from the SFT checkpoint"

    # The reference (adapter disabled) is the SFT model, and RUN/policy is a loadable adapter on it.
    run = trainer.run_dir
    adapter_config = json.loads((run / "policy" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(ppo_policy_path.resolve())
    assert (run / "value_head.safetensors").exists()
    assert summary["iteration"] == 3 and "eval/gold_policy" in summary

    from peft import PeftModel

    from align.modeling import load_causal_lm
    from ppo import core

    ids = torch.tensor([[5, 17, 42, 9, 33, 2]])
    mask = torch.ones_like(ids)
    tokens = ids[:, 3:]

    def logprobs(logits):
        return core.logprobs_from_logits(logits, tokens)

    sft = load_causal_lm(ppo_policy_path).eval()
    with torch.no_grad():
        sft_logp = logprobs(sft(input_ids=ids, attention_mask=mask).logits[:, 2:-1])
        ref_logp = trainer.reference.logprobs(ids, mask, 3, tokens, 1.0)
        policy_logp, _, _ = trainer.model(ids, mask, 3, tokens, 1.0)
        reloaded = PeftModel.from_pretrained(load_causal_lm(ppo_policy_path), run / "policy").eval()
        reloaded_logp = logprobs(reloaded(input_ids=ids, attention_mask=mask).logits[:, 2:-1])
    torch.testing.assert_close(ref_logp, sft_logp, rtol=0, atol=1e-5)
    torch.testing.assert_close(reloaded_logp, policy_logp, rtol=0, atol=1e-5)
    assert not torch.allclose(policy_logp, sft_logp), "the policy should differ from the SFT model"


def test_value_head_learns_at_value_lr_scale_times_the_policy_rate(small_run):
    # One Adam step moves every parameter with a gradient by about its learning rate
    # (m / sqrt(v) = sign(g) on the first step), so the largest moves show the two rates.
    overrides = [*small_run, "num_iterations=1", "num_ppo_epochs=1", "num_mini_batches=1",
                 "gradient_accumulation_steps=1", "num_eval_prompts=0", "value_lr_scale=10"]
    trainer = PPOTrainer(load_config(PPOConfig, None, overrides))
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    moved = {n: (after[n] - b).abs().max().item() for n, b in before.items()}
    value_move = max(v for n, v in moved.items() if n.startswith("value_head."))
    lora_move = max(v for n, v in moved.items() if "lora_" in n)
    assert abs(lora_move - 1e-3) < 1e-4
    assert abs(value_move - 1e-2) < 1e-3


def test_critic_initialised_from_the_reward_model_learns_beside_the_adapter(small_run):
    # value_model=reward_model (InstructGPT): the rollout's values come from a separate critic
    overrides = [*small_run, "num_iterations=2", "num_eval_prompts=0", "value_model=reward_model"]
    trainer = PPOTrainer(load_config(PPOConfig, None, overrides))
    trainer.setup()
    assert trainer.model.value_head is None and trainer.model.critic is not None
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    summary = trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = {n for n, b in before.items() if not torch.equal(after[n], b)}
    assert any(n.startswith("critic.") for n in changed), "the critic did not learn"
    assert any("lora_" in n for n in changed), "the adapter did not learn"
    assert changed <= {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert summary["iteration"] == 2


def test_trimmed_minibatch_gives_the_same_logprobs_and_values(small_run):

    trainer = PPOTrainer(load_config(PPOConfig, None, [*small_run, "response_length=16"]))
    trainer.setup()
    prompts = ["Tell me about tea.", "Hi", "Can you explain the moon to me in simple words, please?", "Why?"]
    exp, _ = trainer.rollout(prompts)
    exp.response_mask[:, 10:] = 0  # as if every response had ended by token 10
    exp.response_mask[1, 3:] = 0
    trimmed = exp.trim_padding()
    assert trimmed.response_ids.shape[1] == 10
    assert trimmed.query_ids.shape[1] == int(exp.query_mask.sum(1).max())  # the longest prompt, no pad column
    with torch.no_grad():
        full, _, values = trainer.model(exp.input_ids, exp.attention_mask, exp.context_length, exp.response_ids, 1.0)
        short, _, t_values = trainer.model(trimmed.input_ids, trimmed.attention_mask, trimmed.context_length,
                                           trimmed.response_ids, 1.0)
    full = full[:, :10]
    mask = trimmed.response_mask.bool()
    torch.testing.assert_close(short[mask], full[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(t_values[mask], values[:, :10][mask], rtol=0, atol=1e-5)
