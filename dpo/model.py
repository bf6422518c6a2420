"""Log-probabilities of whole responses under the policy (or, adapter disabled, the reference),
each prompt encoded once per batch; `PolicyLogprobs` is the module DDP and FSDP2 wrap.

A ranking's K responses share their prompt, and causal attention makes the prompt's keys and
values the same whatever follows, so the batch's distinct prompts go through the model once and
every response continues from its prompt's cache (as the reward stage does,
`reward.model.forward_rewards_shared_prompts`). The first response token is predicted by the
prompt's last state; the logits exist `chunk_tokens` positions at a time (`ppo.core.logprobs_from_hidden`).
"""

from __future__ import annotations

import torch
from torch import nn

from align.forward import OutputHead, model_trunk
from ppo import core
from reward.data import RankingBatch


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, OutputHead]:
    """A causal LM's (a PeftModel's or its base's) transformer without its head, and the head
    (align.forward.OutputHead: the family's own change to the logits included)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return model_trunk(lm), OutputHead(lm)


def response_logprobs(model: nn.Module, batch: RankingBatch, buckets: int, chunk_tokens: int = 0) -> torch.Tensor:
    """(N,) sum of log pi(token) over each response's tokens (its eos included), at temperature 1.

    `model` is a causal LM (a PeftModel or its base). Every response must continue a shared prompt
    (`RankingItem.prompt_len > 0`, as `dpo.data.DPODataset` ensures)."""
    from align.forward import forward_shared_prompts

    body, head = trunk_and_head(model)
    prompt, order, continued = forward_shared_prompts(body, batch.prompt_ids, batch.prompt_mask, batch.prompt_index,
                                                      batch.continuation_ids, batch.continuation_mask, buckets)
    prompt_last = prompt.last_hidden_state[:, -1]  # (U, H): left padding puts every prompt's last token here
    out = []
    for rows, ids, mask, continuation in continued:
        before = torch.cat([prompt_last[rows, None], continuation.last_hidden_state[:, :-1]], dim=1)  # state before each token
        logp, _ = core.logprobs_from_hidden(before, head, ids, 1.0, chunk_tokens)
        out.append(core.zero_masked(logp, mask).sum(-1))
    return torch.cat(out)[torch.argsort(order)]  # back in input order


def response_logprobs_whole(model: nn.Module, batch: RankingBatch, pad_token_id: int, chunk_tokens: int = 0) -> torch.Tensor:
    """(N,) the same sums as `response_logprobs`, each response read whole after its prompt (one
    right-padded pass over prompt + response): what sharded training runs, since FSDP2's backward
    re-gathers a layer for the gradients reaching it through its outputs, not through the keys and
    values a later forward read from a prompt's cache."""
    from align.forward import position_ids_from_mask
    from ppo.model import states_before_tokens

    trunk, head = trunk_and_head(model)
    ids, mask = batch.whole_sequences(pad_token_id)
    hidden = trunk(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                   use_cache=False).last_hidden_state
    starts = batch.prompt_mask.sum(dim=1)[batch.prompt_index]  # (N,) each response's first column
    tokens, token_mask = batch.continuation_ids, batch.continuation_mask
    logp, _ = core.logprobs_from_hidden(states_before_tokens(hidden, starts, tokens.shape[1]), head, tokens, 1.0,
                                        chunk_tokens)
    return core.zero_masked(logp, token_mask).sum(-1)


class PolicyLogprobs(nn.Module):
    """The policy as one module whose forward gives (N,) response log-probabilities: DDP's gradient
    hooks and FSDP2's weight gathering run around a module's forward. `whole`: read each response
    whole after its prompt (under FSDP2 or gradient checkpointing) instead of continuing the prompt's cache."""

    def __init__(self, policy: nn.Module, *, buckets: int, chunk_tokens: int, pad_token_id: int, whole: bool = False):
        super().__init__()
        self.policy = policy  # a PeftModel
        self.buckets, self.chunk_tokens, self.pad_token_id, self.whole = buckets, chunk_tokens, pad_token_id, whole

    def forward(self, batch: RankingBatch) -> torch.Tensor:
        if self.whole:
            return response_logprobs_whole(self.policy, batch, self.pad_token_id, self.chunk_tokens)
        return response_logprobs(self.policy, batch, self.buckets, self.chunk_tokens)
