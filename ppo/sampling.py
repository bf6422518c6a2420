"""Rollout sampling: the policy continues a batch of left-padded prompts, and every sampled
token comes with log pi(a_t|s_t) of the distribution it was drawn from and V(s_t).

PPO needs, for each response token, the behaviour policy's log-probability and the value of
the state (steps 1 and 4 of the iteration). The decoding loop computes both anyway, so they
are kept rather than recomputed by a second full forward of every sequence (a quarter of a
demo iteration). They agree with the full forward to float rounding (tests/ppo/test_sampling.py:
1e-5 in fp32, and within bf16 rounding in bf16, trained adapter, value head, eos and left padding).

The loop is lean where `model.generate` is general: a KV cache of our own allocated once
(ppo.kv_cache; a dynamic cache re-copies every layer's keys and values at each step), position ids
that skip the left padding, and inverse-CDF sampling (`sample_tokens`). Pure sampling at a
temperature, as PPO's log-probs require (no top-k, no top-p).

On a GPU one decoding step of a real model is hundreds of small kernels, and launching them
from Python takes longer than running them. The step's inputs therefore live in fixed buffers
(`DecodeBuffers`) that the loop updates in place, so that `CUDAGraphStep` can capture the step as
a CUDA graph and replay it: gpt-fast's static KV cache and captured decode step, without compiling
(https://github.com/pytorch-labs/gpt-fast). The buffers and the graph are kept across rollouts
(`DecodeBufferPool`), one set per batch size and cache length (rounded up to `CACHE_SLOTS_STEP`),
so a run captures each shape once.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from align.errors import TrainingDiverged, UserError
from align.forward import position_ids_from_mask
from ppo import core

NON_FINITE_LOGITS = "the policy produced non-finite logits while sampling"
NON_FINITE = f"{NON_FINITE_LOGITS} (its weights or activations overflowed); lower the learning rate, or check the data and scores"


CACHE_SLOTS_STEP = 64  # cache lengths are rounded up to a multiple: a graph serves prompts of nearby lengths


class Decoder(Protocol):
    """One decoding step: logits (B, V) and values (B,) (None without a value head) at the last position.

    `cache` is a ppo.kv_cache.RolloutKVCache whose `write_position` says where the step's tokens go;
    `config.num_hidden_layers` is how many attention layers it holds."""

    config: object

    def decode_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    cache: object) -> tuple[torch.Tensor, torch.Tensor | None]: ...


def check_decodable(config: Any, path: Any) -> None:
    """One line for a family the rollout engine cannot decode: BLOOM and Falcon with ALiBi build their
    position bias from the attention mask's length, where the engine's fixed cache is longer (MPT's
    ALiBi, built from the cache, decodes)."""
    kind = getattr(config, "model_type", "")
    if kind == "bloom" or (kind == "falcon" and getattr(config, "alibi", False)):
        raise UserError(f"{path}: align's sampler cannot decode a {kind} model (ALiBi positions): PPO, RLOO and "
                        "GRPO sample with it, and so does DPO's held-out evaluation (`align dpo num_eval_prompts=0` "
                        "trains this model without it)")


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
        raise TrainingDiverged(NON_FINITE)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]  # (B, 1) in [0, total)
    # the first index whose cdf exceeds u: token i owns [cdf[i-1], cdf[i]), empty when p_i = 0
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    return tokens, core.gather_logprobs(logp, tokens)


class CUDAGraphStep:
    """A decoder's `decode_step`, run eagerly at its first call, captured as one CUDA graph at its
    second and replayed at every later call, across rollouts.

    Every call must pass the same tensors (a `DecodeBuffers`' buffers, updated in place) and the same
    cache: a graph replays fixed addresses. The outputs are the graph's own buffers, valid until the
    next call. The eager first call is the warm-up (cuBLAS and allocator set-up stay out of the
    capture); since the cache writes where its `write_position` says, running a step twice rewrites
    the same slots, and the warm-up needs no bookkeeping. Capturing synchronises the device and
    empties PyTorch's caching allocator (`torch.cuda.graph`), one more reason to capture once per
    shape rather than once per rollout. If the step cannot be captured (an op that reads a device
    value on the host, say), the run stops with an error that names `cuda_graphs=false`: a capture that
    failed can leave its side stream current (`torch.cuda.graph`'s exit ends the capture before it
    restores the stream, and ending an invalidated capture raises), so carrying on eagerly in the same
    process would time, and compute, on a stream and memory pool in an unknown state.
    """

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple = ()
        self.outputs: tuple[torch.Tensor, torch.Tensor | None] = (torch.empty(0), None)

    def __call__(self, *inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.calls += 1
        if self.calls == 1:
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
            why = (str(err).splitlines() or [type(err).__name__])[0]
            raise UserError(f"the decoding step could not be captured as a CUDA graph ({why}); set "
                            "cuda_graphs=false to decode eagerly (`align ppo --resume RUN cuda_graphs=false` "
                            "continues a run from its last checkpoint)") from err
        self.graph, self.inputs, self.outputs = graph, inputs, outputs
        graph.replay()
        return outputs


def cache_slots(prompt_length: int, max_new_tokens: int) -> int:
    """The cache length for a prompt and its response, rounded up to a multiple of CACHE_SLOTS_STEP.
    The slots past the response are never written and always masked."""
    return -(-(prompt_length + max_new_tokens) // CACHE_SLOTS_STEP) * CACHE_SLOTS_STEP


class DecodeBuffers:
    """What a decoding step reads, allocated once for a batch size and cache length: the KV cache,
    the attention mask over its slots, the token fed back and its position id. A rollout fills them
    in place (`start`, then `advance` once per token), so that a captured step can replay them.

    The cache's slots: the left-padded prompt at 0..Q-1, the t-th sampled token at Q + t; a slot is
    switched on in the mask once it holds a token."""

    def __init__(self, decoder: Decoder, batch: int, length: int, device: torch.device, cuda_graph: bool):
        from ppo.kv_cache import RolloutKVCache

        self.decoder = decoder
        self.cache = RolloutKVCache(decoder.config.num_hidden_layers, length, device)
        self.mask = torch.zeros(batch, length, dtype=torch.long, device=device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        graphed = cuda_graph and torch.device(device).type == "cuda"
        self.step = CUDAGraphStep(decoder) if graphed else decoder.decode_step

    def start(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the (B, Q) prompts (eagerly: their length varies) into the cleared cache: the logits and
        values at their last position."""
        prompt_len = query_ids.shape[1]
        self.cache.reset()
        self.mask.zero_()
        self.mask[:, :prompt_len] = query_mask
        positions = position_ids_from_mask(query_mask)  # (B, Q) the first real token is position 0
        self.position.copy_(positions[:, -1:])  # left padding: the last column is real in every row
        return self.decoder.decode_step(query_ids, self.mask[:, :prompt_len], positions, self.cache)

    def advance(self, token: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Feed back the (B,) tokens just sampled, written at cache `slot`: the next logits and values."""
        self.mask[:, slot] = 1
        self.position += 1
        self.token.copy_(token[:, None])
        self.cache.seek(slot)
        return self.step(self.token, self.mask, self.position, self.cache)


class DecodeBufferPool:
    """Decode buffers (and on a GPU their captured graphs) kept across rollouts: one set per decoder,
    weights, batch size and cache length; beyond `capacity` sets the least recently used goes.

    `weights` names what the decoder's Python does around its parameters (the policy with its adapter,
    with the adapter merged, the SFT model with the adapter disabled): a graph replays the kernels of
    the call it captured, so each of these needs its own. The parameters' values may change between
    rollouts (the optimiser and merging write them in place, where the graph reads them)."""

    def __init__(self, cuda_graph: bool = False, capacity: int = 4):
        self.cuda_graph = cuda_graph
        self.capacity = capacity
        self.sets: dict[tuple, DecodeBuffers] = {}

    def get(self, decoder: Decoder, weights: str, batch: int, length: int, device: torch.device) -> DecodeBuffers:
        key = (id(decoder), weights, batch, length, str(device))  # a set keeps its decoder alive: the id stays its own
        buffers = self.sets.pop(key, None) or DecodeBuffers(decoder, batch, length, device, self.cuda_graph)
        self.sets[key] = buffers  # the most recently used last
        while len(self.sets) > self.capacity:
            del self.sets[next(iter(self.sets))]
        return buffers


def samples_exactly(model: torch.nn.Module) -> bool:
    """Whether the sampler's log-probs and values equal a full forward's to rounding: with every
    weight in fp32 (tested within 1e-5). With bf16 weights the cached decoding differs by more than
    PPO's first ratio allows, or than the KL measured early in training."""
    return all(p.dtype == torch.float32 for p in model.parameters())


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
    pool: DecodeBufferPool | None = None,
    weights: str = "policy",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Continue (B, Q) left-padded prompts by up to `max_new_tokens` sampled tokens.

    Returns response_ids (B, N) with pad after each row's first eos, logprobs (B, N) of the
    sampled tokens at `temperature` (0 after eos), and values (B, N) V(s_t) of the state each
    token was drawn in (None when the decoder has no value head). Decoding stops once every
    row has ended (noticed within `sync_every` steps; None: 1 on the CPU, 8 on a GPU;
    `max_new_tokens`: never early, as ranks that gather sharded weights at each step need).
    `pool` keeps the step's buffers across calls, and its CUDA graphs with `cuda_graph=True` on a GPU,
    under the name `weights` (see DecodeBufferPool); None: buffers for this call only, no graph.
    """
    batch, prompt_len = query_ids.shape
    device = query_ids.device
    pool = DecodeBufferPool() if pool is None else pool
    buffers = pool.get(decoder, weights, batch, cache_slots(prompt_len, max_new_tokens), device)
    response = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, max_new_tokens, device=device)
    values = torch.zeros(batch, max_new_tokens, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    logits, value = buffers.start(query_ids, query_mask)
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
            raise TrainingDiverged(NON_FINITE)
        if last or (check and bool(done.all())):
            break
        logits, value = buffers.advance(response[:, step], prompt_len + step)
    return response, logprobs, (values if value is not None else None)
