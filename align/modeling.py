"""Loading models and tokenizers from local checkpoints (or the built-in demo model).

The same code serves the demo model and a real checkpoint on a user's disk: nothing here
downloads anything (`local_files_only=True`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from align.errors import UserError
from align.hf import quiet_transformers

log = logging.getLogger("align")


def position_ids_from_mask(attention_mask: Any) -> Any:
    """Positions that skip left padding: the first real token is position 0. (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def resolve_model_path(spec: str | Path) -> Path:
    """`demo`, `demo:tiny`, `demo:small` -> the cached demo model (built on first use); else a local dir."""
    text = str(spec)
    if text == "demo" or text.startswith("demo:"):
        from align.demo_model import SIZES, ensure_demo_model

        size = text.split(":", 1)[1] if ":" in text else "tiny"
        if size not in SIZES or size == "test":
            raise UserError(f"unknown demo model size {size!r}; choose tiny or small")
        return ensure_demo_model(size)
    path = Path(text).expanduser()
    if not path.is_dir():
        raise UserError(f"model not found: {text} (expected a local checkpoint directory, or 'demo')")
    if not (path / "config.json").exists() and not is_adapter_dir(path):
        raise UserError(f"{text} is not a model checkpoint (no config.json or adapter_config.json)")
    return path


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def adapter_base_path(path: str | Path) -> Path:
    """The base checkpoint a PEFT adapter directory was trained on."""
    config = json.loads((Path(path) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{path}: adapter_config.json names no base_model_name_or_path")
    return resolve_model_path(base)


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer, with a pad token distinct from eos.

    A pad equal to eos makes the model unable to tell padding from a real end of text, and
    trainers that mask pad tokens then also mask the eos the policy must learn to emit
    (see "The N implementation details of RLHF with PPO", Huang et al. 2023).
    """
    from transformers import AutoTokenizer

    quiet_transformers()
    path = Path(path)
    source = adapter_base_path(path) if is_adapter_dir(path) and not (path / "tokenizer_config.json").exists() else path
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    if tokenizer.eos_token is None:
        raise UserError(f"{source}: the tokenizer has no eos token")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
        log.info("added a <pad> token distinct from eos to the tokenizer of %s", source)
    return tokenizer


def load_causal_lm(path: str | Path, dtype: Any = None, tokenizer: Any = None) -> Any:
    """A causal LM from a local checkpoint; a LoRA adapter directory is merged into its base."""
    import torch
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    dtype = dtype or torch.float32
    path = Path(path)
    if is_adapter_dir(path):
        from peft import PeftModel

        base = adapter_base_path(path)
        log.info("%s is a LoRA adapter on %s: merging it into the base before use", path, base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, local_files_only=True)
        _fit_embeddings(model, tokenizer)
        model = PeftModel.from_pretrained(model, path).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        _fit_embeddings(model, tokenizer)
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if model.generation_config is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _fit_embeddings(model: Any, tokenizer: Any) -> None:
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
