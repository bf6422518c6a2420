"""Policy, reference and value model, sharing one copy of the SFT weights.

* policy    = SFT checkpoint + a new LoRA adapter (peft); the SFT weights are frozen.
* reference = the same module with the adapter disabled (`disable_adapter()`), so no second
              copy of the model sits in memory; an explicit reference checkpoint is optional.
* value     = a zero-initialised linear head on the policy's last hidden state (it starts
              at V = 0 and learns through the shared LoRA trunk), or a separate critic
              initialised from the reward model, as in InstructGPT (Ouyang et al. 2022).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from align.errors import UserError
from align.forward import OutputHead, model_trunk, position_ids_from_mask
from ppo import core

log = logging.getLogger("align")


def states_before_tokens(hidden: torch.Tensor, response_start: int | torch.Tensor, length: int) -> torch.Tensor:
    """(B, L, H) states -> (B, length, H) the state before each of the `length` response tokens, which
    start at column `response_start` of every row (left-padded prompts), or of each row ((B,) tensor:
    right-padded sequences, `PromptsAndResponses.right_padded`). Contiguous, so that the heads run as
    one matmul (a strided slice that requires grad makes torch.matmul fall back to a slower bmm)."""
    if isinstance(response_start, int):
        return hidden[:, response_start - 1 : response_start - 1 + length].contiguous()
    columns = response_start[:, None] - 1 + torch.arange(length, device=hidden.device)
    columns = columns.clamp(0, hidden.shape[1] - 1)  # past a row's end: padding, masked by the caller
    return hidden.gather(1, columns[..., None].expand(-1, -1, hidden.shape[-1]))


class Critic(nn.Module):
    """A separate value model: a sequence-classification reward model read at every token.

    `compute_dtype` bf16 runs it under bf16 autocast (its trained weights stay fp32)."""

    def __init__(self, reward_model: nn.Module, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.trunk = model_trunk(reward_model)
        head = getattr(reward_model, "score", None) or getattr(reward_model, "classifier", None)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise UserError("value_model=reward_model needs a reward model with a single-output linear head")
        self.head = head
        self.compute_dtype = compute_dtype

    def forward(self, input_ids, attention_mask, position_ids, response_start: int | torch.Tensor,
                length: int) -> torch.Tensor:
        from align.precision import autocast

        with autocast(input_ids.device, self.compute_dtype):
            hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state
            return self.head(states_before_tokens(hidden, response_start, length)).squeeze(-1).float()


class ActorCritic(nn.Module):
    """One module for DDP: forward gives the policy's response logits and the values.

    Without a value model (`critic=None, value_head=False`: RLOO, GRPO, and DPO's sampling) the
    values come back as None."""

    def __init__(self, policy: nn.Module, critic: Critic | None = None, value_head: bool = True):
        from align.forward import cache_argument

        super().__init__()
        self.policy = policy  # a PeftModel
        base = policy.get_base_model()
        self.critic = critic
        self.cache_argument = cache_argument(self.trunk)  # the trunk's name for a KV cache
        if critic is None and value_head:
            self.value_head = nn.Linear(base.config.hidden_size, 1, dtype=torch.float32)
            nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: no spurious advantages
            nn.init.zeros_(self.value_head.bias)
        else:
            self.value_head = None

    # The policy's trunk and head, reached through it rather than registered a second time: a
    # module registered under two names appears twice in state dicts (sharded checkpoints included).
    @property
    def trunk(self) -> nn.Module:
        """The transformer without its head."""
        return model_trunk(self.policy.get_base_model())

    @property
    def lm_head(self) -> OutputHead:
        """The output layer and the family's own change to the logits after it (Gemma 2's soft cap...)."""
        return OutputHead(self.policy.get_base_model())

    def _response_hidden(self, input_ids, attention_mask, position_ids, response_start: int | torch.Tensor,
                         length: int) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
        return states_before_tokens(hidden, response_start, length)

    def policy_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        response_start: int | torch.Tensor, tokens: torch.Tensor, temperature: float,
                        chunk_tokens: int = 0) -> torch.Tensor:
        """(B, T) log pi(token) of the response tokens only (no value computation)."""
        position_ids = position_ids_from_mask(attention_mask)
        hidden = self._response_hidden(input_ids, attention_mask, position_ids, response_start, tokens.shape[1])
        return core.logprobs_from_hidden(hidden, self.lm_head, tokens, temperature, chunk_tokens)[0]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int | torch.Tensor,
        tokens: torch.Tensor, temperature: float, chunk_tokens: int = 0, with_entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(B, L) sequences holding the (B, T) response `tokens` from column `response_start` (an int:
        the same for every row, Q of left-padded prompts; a (B,) tensor: each row's, right-padded
        sequences) -> log pi(token) (B, T), the entropy (B, T) when asked (else None) and the values
        (B, T) of the states before the tokens (None without a value model).
        The logits exist a chunk of `chunk_tokens` positions at a time (core.logprobs_from_hidden)."""
        position_ids = position_ids_from_mask(attention_mask)
        hidden = self._response_hidden(input_ids, attention_mask, position_ids, response_start, tokens.shape[1])
        logprobs, entropy = core.logprobs_from_hidden(hidden, self.lm_head, tokens, temperature, chunk_tokens,
                                                      with_entropy)
        if self.critic is not None:
            values = self.critic(input_ids, attention_mask, position_ids, response_start, tokens.shape[1])
        else:
            values = self.value_head(hidden.float()).squeeze(-1) if self.value_head is not None else None
        return logprobs, entropy, values

    @property
    def config(self) -> Any:
        """The policy's model config (what a KV cache is sized from)."""
        return self.policy.get_base_model().config

    def decode_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    cache: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One sampling step (ppo.sampling): logits (B, V) and V(s) (B,) at the last position, writing
        the step's keys and values into `cache` (a ppo.kv_cache.RolloutKVCache) where it says; no values
        here with a separate critic (it reads whole sequences)."""
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=True, **{self.cache_argument: cache}).last_hidden_state
        hidden = hidden[:, -1]  # (B, H)
        values = self.value_head(hidden.float()).squeeze(-1) if self.value_head is not None else None
        return self.lm_head(hidden), values

    @torch.no_grad()
    def critic_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, context_length: int) -> torch.Tensor:
        """(B, T) the separate critic's V_old(s_t) for the response tokens' states (rollout, no graph)."""
        return self.critic(input_ids, attention_mask, position_ids_from_mask(attention_mask), context_length,
                           input_ids.shape[1] - context_length)

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """The SFT model: the same weights with the LoRA adapter switched off."""
        with self.policy.disable_adapter():
            yield

    @contextlib.contextmanager
    def adapter_merged(self) -> Iterator[None]:
        """The policy with its LoRA update folded into the base weights, for sampling: one matmul
        per layer instead of three (with the static cache, rollouts ~1.6x faster on the demo model;
        fp32 only, see PPOTrainer.sampling_weights).
        The base weights are then restored bit for bit from a copy: unmerging by subtraction
        rounds, and the SFT weights must stay exactly the SFT weights."""
        from peft.tuners.lora import LoraLayer

        # the copies wait in host memory: on a GPU they would double the adapted weights' footprint
        saved = [(layer.get_base_layer().weight, layer.get_base_layer().weight.detach().to("cpu", copy=True))
                 for layer in self.policy.modules() if isinstance(layer, LoraLayer)]
        self.policy.merge_adapter()
        try:
            yield
        finally:
            self.policy.unmerge_adapter()
            with torch.no_grad():
                for weight, original in saved:
                    weight.copy_(original)

    @property
    def value_module(self) -> nn.Module | None:
        """The value head or the critic; None without a value model."""
        return self.critic if self.critic is not None else self.value_head

    def value_parameters(self) -> Iterator[nn.Parameter]:
        """The value head's (or the critic's) own parameters, not the policy trunk they may share."""
        return iter(()) if self.value_module is None else self.value_module.parameters()

    def value_state_dict(self) -> dict[str, torch.Tensor]:
        """What RUN/value_head.safetensors holds: the value head, or the critic's weights."""
        return {k: v.detach().contiguous() for k, v in self.value_module.state_dict().items()}


class Reference:
    """log pi_ref: the policy with its adapter disabled, or a separate frozen checkpoint."""

    def __init__(self, actor_critic: ActorCritic, separate_model: nn.Module | None = None):
        self.actor_critic = actor_critic
        self.separate_model = separate_model

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_start: int | torch.Tensor,
                 tokens: torch.Tensor, temperature: float, chunk_tokens: int = 0) -> torch.Tensor:
        """(B, T) log pi_ref(token) of the response tokens (`response_start` as in ActorCritic.forward)."""
        if self.separate_model is None:
            with self.actor_critic.adapter_disabled():
                return self.actor_critic.policy_logprobs(input_ids, attention_mask, response_start, tokens,
                                                         temperature, chunk_tokens)
        position_ids = position_ids_from_mask(attention_mask)
        hidden = model_trunk(self.separate_model)(input_ids=input_ids, attention_mask=attention_mask,
                                                  position_ids=position_ids, use_cache=False).last_hidden_state
        return core.logprobs_from_hidden(states_before_tokens(hidden, response_start, tokens.shape[1]),
                                         OutputHead(self.separate_model), tokens, temperature, chunk_tokens)[0]


def build_policy(base: nn.Module, lora: Any) -> nn.Module:
    """SFT weights frozen, a fresh LoRA adapter trainable (peft)."""
    from peft import LoraConfig

    for p in base.parameters():
        p.requires_grad_(False)
    from align.lora import lora_summary, portable_lora_targets, resolve_lora_targets, with_adapter

    target = resolve_lora_targets(base, list(lora.target_modules))  # every block covered, or a UserError
    log.info("policy: LoRA on %s", lora_summary(target))
    # short module names in adapter_config.json, as serving engines that load adapters by name expect
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                        bias="none", **portable_lora_targets(base, target))
    return with_adapter(base, config, target)


def _vocabulary(tokenizer: Any) -> dict[str, int]:
    """The tokens and ids two tokenizers must share for the critic to read the policy's ids, less the
    `<pad>` that `align.modeling.load_tokenizer` adds to a tokenizer without a distinct pad: a reward
    model trained elsewhere keeps its own padding (`reward.external`), the policy gets that one, and
    the critic's table grows to the policy's rows either way."""
    return {token: i for token, i in tokenizer.get_vocab().items() if token != "<pad>"}


def build_critic(reward_model: Any, policy_tokenizer: Any, policy_vocab_rows: int,
                 compute_dtype: torch.dtype = torch.float32) -> Critic:
    """A trainable copy of the reward model as the value model (InstructGPT); its weights in fp32
    (all of it trains), its forward under bf16 autocast when `compute_dtype` is bf16.

    The critic reads the policy's sampled token ids as they are, so it must embed every id the policy
    can emit: `policy_vocab_rows`, the policy's embedding rows. A tokenizer longer than its checkpoint's
    embedding (transformers adds `<|endoftext|>` to a fresh byte-level BPE tokenizer, one past a
    32,000-row model) makes align.modeling.load_causal_lm grow the policy's table, while the reward model
    keeps its checkpoint's; the policy then samples the extra id now and then (more often the longer the
    responses) and the critic's embedding lookup read past its table: IndexError on a CPU, a device-side
    assert on a GPU. The scorer never sees such ids (it re-tokenizes decoded text, specials skipped)."""
    from align.precision import upcast_trainable

    if _vocabulary(reward_model.tokenizer) != _vocabulary(policy_tokenizer):
        raise UserError("value_model=reward_model needs the reward model to share the policy's tokenizer; with "
                        "another, use value_model=policy_trunk")
    model = copy.deepcopy(reward_model.model)
    if model.get_input_embeddings().num_embeddings < policy_vocab_rows:
        model.resize_token_embeddings(policy_vocab_rows)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    upcast_trainable(model)
    return Critic(model, compute_dtype)
