"""LoRA adapters for tests, built locally: random (nonzero) weights on a checkpoint or on another
adapter, and the reference merge done by hand with plain transformers + peft."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def save_random_adapter(base: Path, out: Path, tokenizer: Any, seed: int) -> Path:
    """A LoRA adapter on `base` (a checkpoint or an adapter folder, which is merged first) whose B
    matrices are not zero, so that it changes the model; its config names `base`."""
    from peft import LoraConfig, get_peft_model

    from align.modeling import load_causal_lm

    torch.manual_seed(seed)
    model = load_causal_lm(base, tokenizer=tokenizer)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(config))
    return out


def merged_by_hand(checkpoint: Path, adapters: list[Path], tokenizer: Any, dtype: Any = torch.float32) -> Any:
    """`checkpoint` with `adapters` merged in order, each through PeftModel: the expected model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype, local_files_only=True)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    for adapter in adapters:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def bf16_copy(checkpoint: Path, out: Path) -> Path:
    """`checkpoint` saved again with bf16 weights (its config then says so), tokenizer included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out)
    return out
