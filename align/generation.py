"""Batched sampling of responses from a causal LM (candidates for annotation, evaluation)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

from align.chat import encode_rendered, keep_end, pad_rows, render_prompt

log = logging.getLogger("align")


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """torch's generators seeded with `seed` inside, and as they were after: the CPU's and, where
    there is one, the current GPU's (torch.manual_seed reseeds both; fork_rng restores only what it
    is given). Seeded samples leave the caller's random state untouched."""
    import torch

    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def only_these_settings(model: Any) -> Iterator[None]:
    """`model.generate` reads no setting from the checkpoint's generation_config inside (restored after).
    transformers fills every setting a caller's GenerationConfig leaves unset from the model's own
    (repetition_penalty 1.1 from Qwen2.5-Instruct's, no_repeat_ngram_size, min_new_tokens, ...), so an
    explicit GenerationConfig alone does not make sampling pure; with an empty default in place, what
    the caller leaves unset takes the library's neutral values. A PEFT model generates through its base."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = own


def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: list,
    *,
    num_return_sequences: int = 1,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    device: Any = None,
) -> list[list[str]]:
    """`num_return_sequences` sampled responses per prompt (greedy when temperature is 0).

    Pure sampling (no top-k) by default, so that samples follow the model's distribution,
    as PPO's rollouts and the SFT baseline they are compared with must: the checkpoint's
    generation_config (a repetition penalty, top-k, ...) is not applied, only the arguments here
    and the tokenizer's bos, eos and pad (one eos, the one PPO's rollouts stop at).
    `device` None: the GPU when there is one (the model is moved there, in place), else where it is.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    from align.modeling import fit_prompt_length
    from align.precision import default_device

    model.to(default_device() if device is None else device)

    texts = [render_prompt(tokenizer, p) for p in prompts]
    sampling = temperature > 0
    config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=0 if sampling else None,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences,
    )
    room = fit_prompt_length(None, max_new_tokens, model, "max_new_tokens")  # None: no position table bounds it
    # encoded and cut as PPO encodes its prompts (the end kept, a bos first), left-padded: decoder-only
    # generation continues from the right edge
    rows = encode_rendered(tokenizer, texts, sys.maxsize)
    if room is not None and (cut := sum(len(ids) > room for ids in rows)):
        rows = [keep_end(ids, room, tokenizer.bos_token_id) for ids in rows]
        log.warning("%d of %d prompts were cut to their last %d tokens: the model reads %d positions, %d of them "
                    "for max_new_tokens", cut, len(rows), room, room + max_new_tokens, max_new_tokens)
    out: list[list[str]] = []
    was_training = model.training
    model.eval()
    with seeded(seed), torch.no_grad(), only_these_settings(model):
        for start in tqdm(range(0, len(texts), batch_size), disable=not progress, desc="generating", unit="batch"):
            ids, mask = pad_rows(rows[start : start + batch_size], tokenizer.pad_token_id, left=True)
            batch = {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)}
            generated = model.generate(**batch, generation_config=config)
            decoded = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            for i in range(0, len(decoded), num_return_sequences):
                out.append([d.strip() for d in decoded[i : i + num_return_sequences]])
    model.train(was_training)
    return out
