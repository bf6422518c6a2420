"""Policy = SFT + LoRA: the SFT weights never move; only adapter and value head learn."""

from __future__ import annotations

import json

import torch

from align.config import load_config
from ppo.config import PPOConfig
from ppo.trainer import PPOTrainer


def test_base_weights_bit_identical_only_adapter_and_value_head_change(small_run, ppo_policy_path):
    from safetensors.torch import load_file

    trainer = PPOTrainer(load_config(PPOConfig, None, small_run))
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

    from align.modeling import load_causal_lm
    from peft import PeftModel

    ids = torch.tensor([[5, 17, 42, 9, 33, 2]])
    mask = torch.ones_like(ids)
    sft = load_causal_lm(ppo_policy_path).eval()
    with torch.no_grad():
        sft_logits = sft(input_ids=ids, attention_mask=mask).logits[:, 2:-1]
        ref_logits = trainer.reference.logits(ids, mask, context_length=3)
        policy_logits, _ = trainer.model(ids, mask, context_length=3)
        reloaded = PeftModel.from_pretrained(load_causal_lm(ppo_policy_path), run / "policy").eval()
        reloaded_logits = reloaded(input_ids=ids, attention_mask=mask).logits[:, 2:-1]
    torch.testing.assert_close(ref_logits, sft_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(reloaded_logits, policy_logits, rtol=0, atol=1e-5)
    assert not torch.allclose(policy_logits, sft_logits), "the policy should differ from the SFT model"
