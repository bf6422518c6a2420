"""Log-probabilities of whole responses under the policy (or, adapter disabled, the reference),
each prompt encoded once per batch.

A ranking's K responses share their prompt, and causal attention makes the prompt's keys and
values the same whatever follows, so the batch's distinct prompts go through the model once and
every response continues from its prompt's cache (as the reward stage does,
`reward.model.forward_rewards_shared_prompts`). The first response token is predicted by the
prompt's last state; the logits exist `chunk_tokens` positions at a time (`ppo.core.logprobs_from_hidden`).
"""

from __future__ import annotations

import torch
from torch import nn

from ppo import core
from reward.data import RankingBatch


def response_logprobs(model: nn.Module, batch: RankingBatch, buckets: int, chunk_tokens: int = 0) -> torch.Tensor:
    """(N,) sum of log pi(token) over each response's tokens (its eos included), at temperature 1.

    `model` is a causal LM (a PeftModel or its base). Every response must continue a shared prompt
    (`RankingItem.prompt_len > 0`, as `dpo.data.DPODataset` ensures)."""
    from align.modeling import position_ids_from_mask, prompt_cache_rows
    from reward.model import length_slices

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    trunk, head = getattr(lm, lm.base_model_prefix), lm.get_output_embeddings()
    prompt = trunk(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                   position_ids=position_ids_from_mask(batch.prompt_mask), use_cache=True)
    prompt_last = prompt.last_hidden_state[:, -1]  # (U, H): left padding puts every prompt's last token here
    prompt_lengths = batch.prompt_mask.sum(dim=1)
    lengths = batch.continuation_mask.sum(dim=1)
    order, slices = length_slices(lengths, buckets)
    out = []
    for idx in slices:
        width = int(lengths[idx].max())
        rows = batch.prompt_index[idx]
        ids, mask = batch.continuation_ids[idx, :width], batch.continuation_mask[idx, :width]
        positions = prompt_lengths[rows, None] + torch.arange(width, device=ids.device)
        hidden = trunk(input_ids=ids, attention_mask=torch.cat([batch.prompt_mask[rows], mask], dim=1),
                       position_ids=positions, past_key_values=prompt_cache_rows(prompt.past_key_values, rows),
                       use_cache=True).last_hidden_state  # (n, width, H)
        before = torch.cat([prompt_last[rows, None], hidden[:, :-1]], dim=1)  # the state before each token
        logp, _ = core.logprobs_from_hidden(before, head, ids, 1.0, chunk_tokens)
        out.append((logp * mask).sum(-1))
    return torch.cat(out)[torch.argsort(order)]  # back in input order
