"""Rollout sampling: the policy continues a batch of left-padded prompts, and every sampled
token comes with log pi(a_t|s_t) of the distribution it was drawn from and V(s_t).

PPO needs, for each response token, the behaviour policy's log-probability and the value of
the state (steps 1 and 4 of the iteration). The decoding loop computes both anyway, so they
are kept rather than recomputed by a second full forward of every sequence (a quarter of a
demo iteration). They agree with the full forward to float rounding (test: 1e-5 in fp32).

The loop is lean where `model.generate` is general: a static KV cache allocated once (a
dynamic cache re-copies every layer's keys and values at each step), position ids that skip
the left padding, and inverse-CDF sampling (`sample_tokens`). Pure sampling at a temperature,
as PPO's log-probs require (no top-k, no top-p).
"""

from __future__ import annotations

from typing import Protocol

import torch

from align.modeling import position_ids_from_mask
from ppo import core

NON_FINITE = "the policy produced non-finite logits while sampling"


class Decoder(Protocol):
    """One decoding step: logits (B, V) and values (B,) (None without a value head) at the last position."""

    config: object

    def decode_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
               cache: object, cache_position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def sample_tokens(logits: torch.Tensor, temperature: float, check_finite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row drawn from softmax(logits / temperature), and its log-probability.

    (B, V) -> tokens (B,), logprobs (B,). Inverts each row's CDF with one uniform draw: exact
    sampling like `torch.multinomial`, which instead draws V exponentials per row (at V = 1024
    a fifth of the decoding time on a CPU). A token of probability 0 is never drawn.
    `check_finite=False` leaves the check to the caller (a row of NaN logits gives a NaN log-prob).
    """
    logp = core.log_softmax(logits, temperature)  # (B, V)
    cdf = logp.exp().cumsum(-1)  # (B, V)
    if check_finite and not torch.isfinite(cdf[:, -1]).all():  # multinomial would raise too
        raise FloatingPointError(NON_FINITE)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]  # (B, 1) in [0, total)
    # the first index whose cdf exceeds u: token i owns [cdf[i-1], cdf[i]), empty when p_i = 0
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    return tokens, core.gather_logprobs(logp, tokens)


@torch.no_grad()
def sample_responses(
    decoder: Decoder,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    eos_token_id: int,
    pad_token_id: int,
    sync_every: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Continue (B, Q) left-padded prompts by up to `max_new_tokens` sampled tokens.

    Returns response_ids (B, N) with pad after each row's first eos, logprobs (B, N) of the
    sampled tokens at `temperature` (0 after eos), and values (B, N) V(s_t) of the state each
    token was drawn in (None when the decoder has no value head). Decoding stops once every
    row has ended (noticed within `sync_every` steps; None: 1 on the CPU, 8 on a GPU).
    """
    from transformers import StaticCache

    batch, prompt_len = query_ids.shape
    device = query_ids.device
    cache = StaticCache(config=decoder.config, max_cache_len=prompt_len + max_new_tokens)
    # (B, Q + N): the cache's slots; a generated position is switched on once it holds a token
    mask = torch.cat([query_mask, query_mask.new_zeros(batch, max_new_tokens)], dim=1)
    positions = position_ids_from_mask(query_mask)  # (B, Q) the first real token is position 0
    response = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, device=device)
    values = torch.zeros(batch, max_new_tokens, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    logits, value = decoder.decode_step(query_ids, mask[:, :prompt_len], positions, cache,
                                   torch.arange(prompt_len, device=device))
    position = positions[:, -1:]  # (B, 1) left padding: the last column is real in every row
    # Reading a device value on the host waits for every queued kernel, and a decode step on a GPU is
    # launch-bound (small kernels): there the host asks whether all rows have ended (and whether the
    # logits were finite) every `sync_every` steps, so it can queue the next steps meanwhile. The rows
    # that ended only get pad tokens in between. On the CPU there is no queue: every step.
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 8
    for step in range(max_new_tokens):
        token, logp = sample_tokens(logits, temperature, check_finite=sync_every == 1)
        response[:, step] = torch.where(done, pad_token_id, token)
        logprobs[:, step] = torch.where(done, 0.0, logp)
        if value is not None:
            values[:, step] = torch.where(done, 0.0, value.float())
        done |= token == eos_token_id
        last, check = step == max_new_tokens - 1, (step + 1) % sync_every == 0
        if sync_every > 1 and (last or check) and not torch.isfinite(logprobs[:, : step + 1]).all():
            raise FloatingPointError(NON_FINITE)
        if last or (check and bool(done.all())):
            break
        slot = prompt_len + step
        mask[:, slot] = 1
        position = position + 1
        logits, value = decoder.decode_step(response[:, step, None], mask, position, cache,
                                       torch.tensor([slot], device=device))
    return response, logprobs, (values if value is not None else None)
