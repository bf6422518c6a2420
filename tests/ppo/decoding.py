"""The sampler's exactness check, shared by tests/ppo, tests/families and tests/cuda: the decoding step on
the KV cache (ppo.kv_cache, ppo.sampling) against the eager full forward of the same model, with a
trained adapter and value head, left-padded prompts of different lengths and rows that end early."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.forward import position_ids_from_mask
from ppo.sampling import sample_responses

# What the sampler's log-probs and values may differ from the training forward's by: float rounding in
# fp32; in bf16 the cached step's smaller matmuls round differently (measured on an AVX-512 CPU: 1e-3 and 2e-3),
# while a write one slot off moves them by 0.04 and 0.14 (tests/ppo/test_sampling.py, off_by_one).
TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2}


class FullForwardDecoder:
    """The reference decoder: at every step the whole sequence so far runs through the model without a
    cache, read at its last position. What the cached step must reproduce, token for token."""

    def __init__(self, actor_critic):
        self.model = actor_critic
        self.config = actor_critic.config
        self.ids: torch.Tensor | None = None

    def decode_step(self, input_ids, attention_mask, position_ids, cache):
        prompt = attention_mask.shape[1] == input_ids.shape[1]  # the prompt's mask covers only it
        self.ids = input_ids if prompt else torch.cat([self.ids, input_ids], dim=1)
        mask = attention_mask[:, : self.ids.shape[1]]  # slot i of the cache holds token i of the sequence
        hidden = self.model.trunk(input_ids=self.ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                  use_cache=False).last_hidden_state[:, -1]
        head = self.model.value_head
        return self.model.lm_head(hidden), (head(hidden.float()).squeeze(-1) if head is not None else None)


def train_a_little(actor_critic, seed: int = 0, std: float = 0.1) -> None:
    """Random non-zero LoRA B matrices and value head, as after some training (a fresh adapter adds
    nothing, and a fresh value head says 0 everywhere: neither would show a wrong key or value)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in actor_critic.named_parameters():
            if "lora_B" in name or name.startswith("value_head."):
                p.copy_(torch.randn(p.shape, generator=generator) * std)


def left_padded_prompts(tokenizer, count: int = 4, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Q) ids and mask of `count` chat prompts of different lengths, left-padded."""
    from align.chat import render_prompt
    from align.synthetic import make_prompts

    tokenizer.padding_side = "left"
    enc = tokenizer([render_prompt(tokenizer, p) for p in make_prompts(count, seed=1)], return_tensors="pt",
                    padding=True, add_special_tokens=False)
    lengths = enc["attention_mask"].sum(-1)
    assert lengths.unique().numel() > 1, "the prompts should differ in length (left padding)"
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@dataclass
class Discrepancy:
    """How far the cached decoding is from the eager full forward."""

    same_tokens: bool  # sampled with the same seed, step by step
    logprobs: float  # max |difference| over the response tokens (up to each row's eos)
    values: float
    rows_ended_early: int  # rows whose eos came before the last step
    rows_ran_on: int  # rows still going after the first row ended


def _sample(decoder, ids, mask, seed, **kwargs):
    torch.manual_seed(seed)
    return sample_responses(decoder, ids, mask, **kwargs)


def early_eos(actor_critic, ids, mask, *, seed: int, steps: int, temperature: float, row: int = 0, at: int = 2) -> int:
    """A token id that `row` samples at step `at` with this seed: used as eos, that row ends there
    while the others (most likely) run on. The sampled tokens do not depend on the eos id before then."""
    response, _, _ = _sample(actor_critic, ids, mask, seed, max_new_tokens=steps, temperature=temperature,
                             eos_token_id=-1, pad_token_id=0)
    return int(response[row, at])


def decoding_discrepancy(actor_critic, ids, mask, *, eos: int, pad: int, seed: int = 0, steps: int = 12,
                         temperature: float = 1.0, pool=None) -> Discrepancy:
    """Sample with the cached step and with FullForwardDecoder from the same seed; compare the tokens,
    and the log-probs and values of the response tokens, which PPO takes from the sampler, with those
    of the training forward (ActorCritic.forward) on the sampled sequences."""
    kwargs = {"max_new_tokens": steps, "temperature": temperature, "eos_token_id": eos, "pad_token_id": pad}
    response, logprobs, values = _sample(actor_critic, ids, mask, seed, pool=pool, **kwargs)
    reference, _, _ = _sample(FullForwardDecoder(actor_critic), ids, mask, seed, **kwargs)
    ended = (response == eos).cumsum(-1)
    in_response = (ended == 0) | ((ended == 1) & (response == eos))  # up to and including the first eos
    with torch.no_grad():
        full_ids = torch.cat([ids, response], dim=1)
        full_mask = torch.cat([mask, in_response.long()], dim=1)
        forward_logprobs, _, forward_values = actor_critic(full_ids, full_mask, ids.shape[1], response, temperature)
    first_end = torch.where(ended[:, -1] > 0, (ended == 0).sum(-1), steps)
    return Discrepancy(
        same_tokens=torch.equal(response, reference),
        logprobs=(logprobs - forward_logprobs).abs()[in_response].max().item(),
        values=(values - forward_values.float()).abs()[in_response].max().item(),
        rows_ended_early=int((first_end < steps - 1).sum()),
        rows_ran_on=int((first_end > first_end.min()).sum()),
    )


def trained_trainer(model_path, out, dtype: str = "float32", *overrides: str):
    """A PPOTrainer set up on `model_path` (no reward model) whose adapter and value head `train_a_little`."""
    from align.config import load_config
    from ppo.config import PPOConfig
    from ppo.trainer import PPOTrainer

    trainer = PPOTrainer(load_config(PPOConfig, None, [f"policy_model={model_path}", f"output_dir={out}",
                                                         "reward_model=unused", f"dtype={dtype}", *overrides]),
                         reward_model=object())
    trainer.setup()
    train_a_little(trainer.model)
    return trainer


def discrepancy_on_prompts(trainer, steps: int = 12, device: str | torch.device = "cpu", **kwargs) -> Discrepancy:
    """`decoding_discrepancy` on four left-padded chat prompts, the first row ending at its third token."""
    ids, mask = left_padded_prompts(trainer.tokenizer, device=device)
    eos = early_eos(trainer.model, ids, mask, seed=0, steps=steps, temperature=1.0)
    return decoding_discrepancy(trainer.model, ids, mask, eos=eos, pad=trainer.tokenizer.pad_token_id, seed=0,
                                steps=steps, **kwargs)
