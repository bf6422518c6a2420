"""Exported policy adapters name their targets the way serving engines read them: short module
names (and layers_to_transform for some blocks only), and PEFT reloads them to the same model."""

from __future__ import annotations

import json

import pytest
import torch

from align.lora import portable_lora_targets, resolve_lora_targets
from align.modeling import load_causal_lm, load_tokenizer


def test_a_policy_adapter_is_saved_with_short_target_names_and_reloads_identically(tiny_random_model, tmp_path):
    from peft import PeftModel

    from align.config import LoraOptions
    from ppo.model import build_policy

    tokenizer = load_tokenizer(tiny_random_model)
    policy = build_policy(load_causal_lm(tiny_random_model, tokenizer=tokenizer), LoraOptions())
    with torch.no_grad():  # a trained adapter: B != 0, so the reload is checked on what the adapter adds
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    policy.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                               "v_proj"]
    assert saved.get("layers_to_transform") is None

    reloaded = PeftModel.from_pretrained(load_causal_lm(tiny_random_model, tokenizer=tokenizer), tmp_path / "adapter")
    adapted = {n for n, _ in policy.named_modules() if n.endswith("lora_A")}
    assert {n for n, _ in reloaded.named_modules() if n.endswith("lora_A")} == adapted
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, policy(input_ids=ids).logits)


def test_some_blocks_only_use_layers_to_transform_and_peft_adapts_exactly_those(tiny_random_model):
    from peft import LoraConfig, get_peft_model

    model = load_causal_lm(tiny_random_model)
    targets = resolve_lora_targets(model, ["q_proj", "v_proj"], layers=[1])
    portable = portable_lora_targets(model, targets)
    assert portable == {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1], "layers_pattern": "layers"}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **portable))
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in peft_model.named_modules()
               if n.endswith("lora_A")}
    assert adapted == set(targets)


@pytest.mark.parametrize("extra", ["vision.q_proj"])
def test_a_name_that_would_reach_outside_the_blocks_keeps_the_qualified_names(tiny_random_model, extra):
    model = load_causal_lm(tiny_random_model)
    parent, _, child = extra.rpartition(".")
    holder = torch.nn.Module()
    holder.add_module(child, torch.nn.Linear(4, 4))
    model.add_module(parent, holder)
    targets = resolve_lora_targets(model, ["all-linear"])
    assert portable_lora_targets(model, targets) == {"target_modules": targets}
