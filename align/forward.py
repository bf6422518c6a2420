"""Forward passes every stage shares, on any transformers causal LM: positions that skip left
padding, continuations that share their prompt's KV cache (each prompt forwarded once), and the
output layer applied to the trunk's states as the checkpoint's own forward applies it.

Only transformers' public API: a cache passed and returned under either of its names, built through
`DynamicCache`'s constructor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from align.errors import UserError


def position_ids_from_mask(attention_mask: Any) -> Any:
    """Positions that skip left padding: the first real token is position 0. (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def prompt_cache_rows(cache: Any, rows: Any) -> Any:
    """A new cache holding the rows `rows` (a (n,) index) of a prompt batch's KV cache: each
    continuation reads its own prompt's keys and values. Built through `DynamicCache`'s public
    constructor from per-layer (keys, values) pairs.

    Rows repeat (a prompt's K responses), so the backward adds several gradients into one row: on the
    CPU, indexing's backward adds them in the order its threads arrive (a run is not reproducible),
    index_select's in index order; on CUDA the reverse holds (torch.use_deterministic_algorithms)."""
    from transformers import DynamicCache

    pick = (lambda t: t.index_select(0, rows)) if rows.device.type == "cpu" else (lambda t: t[rows])
    return DynamicCache([(pick(layer.keys), pick(layer.values)) for layer in cache.layers])


def cache_argument(model: Any) -> str:
    """The name under which `model.forward` takes a KV cache: `cache` from transformers 5.25 on,
    where `past_key_values` is deprecated (to be removed in 5.40), and `past_key_values` before.
    Wrappers that pass their keywords on (DDP's `module`, a peft model's base model) are looked
    through to the transformers model."""
    import inspect

    while True:
        parameters = inspect.signature(model.forward).parameters
        for name in ("cache", "past_key_values"):
            if name in parameters:
                return name
        inner = model.get_base_model() if hasattr(model, "get_base_model") else getattr(model, "module", None)
        if inner is None or inner is model:
            return "past_key_values"
        model = inner


def returned_cache(outputs: Any) -> Any:
    """The KV cache a forward run with `use_cache=True` returned, under either name (see
    `cache_argument`)."""
    return outputs["cache"] if "cache" in outputs else outputs["past_key_values"]


def model_trunk(model: Any) -> Any:
    """A transformers model's transformer without its head (LlamaForCausalLM.model, ...)."""
    return getattr(model, model.base_model_prefix)


class OutputHead:
    """A causal LM's output layer and what its forward then does to the logits: Gemma 2 and 3's soft
    cap, cap * tanh(logits / cap) (`final_logit_softcapping`), Granite's division by `logits_scaling`,
    Cohere's multiplication by `logit_scale`. Every stage computes logits from the trunk's states (a
    chunk of positions at a time), through this, so that it samples and trains the checkpoint's own
    distribution; `check_output_head` holds it to the model's forward when the model loads. A plain
    callable, not a module: the output layer stays registered once, in the model."""

    def __init__(self, model: Any):
        config = model.config.get_text_config()
        self.linear = model.get_output_embeddings()
        # logit_scale is the Cohere families' setting (cohere, cohere2, cohere2_moe, ...); MPT's config has one
        # its forward never applies
        cohere = str(getattr(config, "model_type", "")).startswith("cohere")
        self.scale = 1.0 / (getattr(config, "logits_scaling", None) or 1.0) * (
            (getattr(config, "logit_scale", None) or 1.0) if cohere else 1.0)
        self.softcap = getattr(config, "final_logit_softcapping", None) or None

    def __call__(self, hidden: Any) -> Any:
        import torch

        logits = self.linear(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# The families whose forwards tests/families holds OutputHead to (tests/families/test_logit_transforms.py):
# they load without the check, which costs a forward of the whole model (about 25 s a process at 70B
# on a CPU). Any other family is checked as it loads.
OUTPUT_HEAD_TESTED = frozenset({"llama", "qwen2", "qwen3", "mistral", "gemma", "phi3", "gpt2", "gpt_neox", "opt",
                                "olmo", "smollm3", "mixtral", "qwen3_moe", "gemma2", "granite", "cohere", "mpt"})


def check_output_head(model: Any, path: str | Path) -> None:
    """One line when the model's forward does something to its logits after the output layer that
    `OutputHead` does not reproduce: align would sample and train another distribution than the
    checkpoint's. Two tokens through the model, checked once as it loads."""
    import torch

    ids = torch.tensor([[1, 2]]).clamp(max=model.get_input_embeddings().num_embeddings - 1)
    with torch.no_grad():
        whole = model(input_ids=ids, use_cache=False).logits.float()
        ours = OutputHead(model)(model_trunk(model)(input_ids=ids, use_cache=False).last_hidden_state).float()
    gap = (whole - ours).abs().max().item()
    if not gap <= 1e-3 * max(1.0, whole.abs().max().item()):
        raise UserError(f"{path}: the {model.config.model_type} model changes its logits after the output layer in a "
                        f"way align does not reproduce (they differ by {gap:.3g}); this family cannot be trained here")


def length_slices(lengths: Any, buckets: int) -> tuple[Any, list[Any]]:
    """(order, slices): the indices sorted by length, cut into `buckets` slices (1 when there are
    fewer than 2 per slice); each slice is then run cut to its own longest sequence."""
    import torch

    order = torch.argsort(lengths)
    n_slices = buckets if buckets > 1 and len(order) >= 2 * buckets else 1
    return order, list(torch.tensor_split(order, n_slices))


def forward_shared_prompts(model: Any, prompt_ids: Any, prompt_mask: Any, prompt_index: Any, continuation_ids: Any,
                           continuation_mask: Any, buckets: int) -> tuple[Any, Any, Iterator[tuple[Any, ...]]]:
    """Continuations that share prompts, each prompt forwarded once. Causal attention makes a
    prompt's keys and values the same whatever follows, so the U distinct prompts ((U, P) left-padded)
    go through `model` once with the cache on, and each of the N continuations ((N, C) right-padded;
    `prompt_index` (N,) names its prompt) continues from its prompt's cached keys and values, in
    `buckets` length-sorted slices, each cut to its longest.

    Returns the prompts' output, the continuations' order (sorted by length: a result per slice,
    concatenated, goes back to input order with `[torch.argsort(order)]`) and, lazily, for each slice:
    (its continuations' rows in the prompt batch, their ids and mask cut to the slice's width, the
    slice's output)."""
    import torch
    from transformers import DynamicCache

    # A plain cache keeps every prompt position: the one a model makes itself keeps only the last window's
    # keys in a sliding-window layer (Gemma 2/3), which the continuations' masks, covering the whole prompt,
    # would not fit. The sliding window is still applied, by the masks.
    cache_name = cache_argument(model)
    prompt_out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids_from_mask(prompt_mask),
                       use_cache=True, **{cache_name: DynamicCache()})
    cache = returned_cache(prompt_out)
    prompt_lengths = prompt_mask.sum(dim=1)  # (U,) real prompt tokens
    lengths = continuation_mask.sum(dim=1)
    order, slices = length_slices(lengths, buckets)

    def continued() -> Iterator[tuple[Any, ...]]:
        for idx in slices:
            width, rows = int(lengths[idx].max()), prompt_index[idx]
            ids, mask = continuation_ids[idx, :width], continuation_mask[idx, :width]
            # after the prompt; a row's right padding stays at its last position: run on past it, the padding
            # of a long prompt's row in the slice of a longer response would index past a table of learned
            # positions (GPT-2, OPT) that every sequence fits
            positions = prompt_lengths[rows, None] + position_ids_from_mask(mask)
            yield rows, ids, mask, model(input_ids=ids, attention_mask=torch.cat([prompt_mask[rows], mask], dim=1),
                                         position_ids=positions, use_cache=True,
                                         **{cache_name: prompt_cache_rows(cache, rows)})

    return prompt_out, order, continued()
