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

On a GPU one decoding step of a real model is hundreds of small kernels, and launching them
from Python takes longer than running them. The step's inputs therefore live in fixed buffers
that the loop updates in place, so that `CUDAGraphStep` can capture the step once per rollout
as a CUDA graph and replay it (gpt-fast's static cache + captured decode step, without compiling).
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from align.modeling import position_ids_from_mask
from ppo import core

NON_FINITE = "the policy produced non-finite logits while sampling"

log = logging.getLogger("align")


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


class CUDAGraphStep:
    """A decoder's `decode_step`, run eagerly at its first call, captured as one CUDA graph at its
    second and replayed after.

    Every call must pass the same tensors (the sampling loop's buffers, updated in place) and the
    same cache: a graph replays fixed addresses. The outputs are the graph's own buffers, valid
    until the next call. Each step must run exactly once: transformers' StaticCache counts the
    tokens it has stored in a device tensor, so an extra warm-up step would shift every later write
    (and run past the cache's end). The eager first step is the warm-up (cuBLAS and allocator set-up
    stay out of the capture), and a capture runs nothing until it is replayed. If the step cannot be
    captured (an op that reads a device value on the host, say), it runs eagerly from then on, with
    a warning.
    """

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager = False
        self.inputs: tuple = ()
        self.outputs: tuple[torch.Tensor, torch.Tensor | None] = (torch.empty(0), None)

    def __call__(self, *inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.calls += 1
        if self.eager or self.calls == 1:
            return self.decoder.decode_step(*inputs)
        if self.graph is None:
            return self._capture(inputs)
        if any(a is not b for a, b in zip(inputs, self.inputs)):
            raise ValueError("CUDAGraphStep replays fixed buffers: pass the same tensors at every step")
        self.graph.replay()
        return self.outputs

    def _capture(self, inputs: tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = self.decoder.decode_step(*inputs)
        except RuntimeError as err:
            log.warning("the decoding step could not be captured as a CUDA graph, so it runs eagerly "
                        "(slower on a GPU): %s", str(err).splitlines()[0])
            self.eager = True
            return self.decoder.decode_step(*inputs)
        self.graph, self.inputs, self.outputs = graph, inputs, outputs
        graph.replay()
        return outputs


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
    cuda_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Continue (B, Q) left-padded prompts by up to `max_new_tokens` sampled tokens.

    Returns response_ids (B, N) with pad after each row's first eos, logprobs (B, N) of the
    sampled tokens at `temperature` (0 after eos), and values (B, N) V(s_t) of the state each
    token was drawn in (None when the decoder has no value head). Decoding stops once every
    row has ended (noticed within `sync_every` steps; None: 1 on the CPU, 8 on a GPU).
    `cuda_graph`: replay the decoding step as a CUDA graph (`CUDAGraphStep`; a GPU only).
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
    # the decoding step's inputs, updated in place (fixed addresses for a CUDA graph)
    step_ids = response[:, :1].clone()  # (B, 1) the token fed back
    position = positions[:, -1:].clone()  # (B, 1) left padding: the last column is real in every row
    slot = torch.zeros(1, dtype=torch.long, device=device)  # the cache position written
    decode_step = CUDAGraphStep(decoder) if cuda_graph and device.type == "cuda" else decoder.decode_step
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
        mask[:, prompt_len + step] = 1
        position += 1
        step_ids.copy_(response[:, step, None])
        slot.fill_(prompt_len + step)
        logits, value = decode_step(step_ids, mask, position, cache, slot)
    return response, logprobs, (values if value is not None else None)
