"""The final evaluation of a policy run (PPO, RLOO, GRPO, DPO): SFT vs policy samples on held-out prompts.

    eval/reward_sft, eval/reward_policy    reward-model scores of each model's samples (with a reward model)
    eval/kl                                per-sequence KL(policy || reference) of the policy's samples
    eval/eos_rate_sft, eval/eos_rate_policy
    eval/gold_*                            only with a `judge`: an independent score of (prompt, response),
                                           e.g. the synthetic task's gold judge (`ppo.data.gold_judge`)

The samples depend on the final weights only (a fixed seed per batch), not on the training RNG.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from typing import Any, Protocol

import torch

from align.errors import TrainingDiverged
from align.generation import seeded
from ppo import core

EVAL_SEED_OFFSET = 10_007

Judge = Callable[[Any, str], float]  # (prompt, response) -> score


class Sampler(Protocol):
    """What the evaluation needs of a trained policy (`PPOTrainer`, `PolicySampler`)."""

    tokenizer: Any

    def generate(self, prompts: list, adapter: bool = True) -> Any: ...  # ppo.experience.Samples

    def decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]: ...

    def reference_logprobs(self, seqs: Any) -> torch.Tensor: ...

    def sampled_logprobs(self, samples: Any) -> torch.Tensor: ...  # log pi of samples, as the reference's are read


@torch.no_grad()
def evaluate(sampler: Sampler, prompts: list, judge: Judge | None = None, *, batch_size: int, seed: int,
             kl_estimator: str = "k1", reward_model: Any = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Metrics and per-prompt samples of a trained policy on `prompts`, `batch_size` at a time."""
    sft_texts, pol_texts, seq_kl, eos = [], [], [], {"sft": [], "policy": []}
    for s in range(0, len(prompts), batch_size):
        batch = prompts[s: s + batch_size]
        for which in ("sft", "policy"):
            with seeded(seed + EVAL_SEED_OFFSET + s):
                try:
                    samples = sampler.generate(batch, adapter=which == "policy")
                except TrainingDiverged as err:
                    raise TrainingDiverged(f"evaluation after training ({which} samples): {err}") from None
            texts = sampler.decode(samples.response_ids, samples.response_mask)
            eos[which].extend((samples.response_ids == sampler.tokenizer.eos_token_id).any(-1).tolist())
            if which == "sft":
                sft_texts.extend(texts)
                continue
            pol_texts.extend(texts)
            kl = core.kl_penalty(sampler.sampled_logprobs(samples), sampler.reference_logprobs(samples),
                                 kl_estimator, samples.response_mask, bounded=False)  # measured, not trained
            seq_kl.extend(kl.sum(-1).tolist())
    sft_rewards = pol_rewards = [None] * len(prompts)
    metrics: dict[str, float] = {}
    if reward_model is not None:
        sft_rewards = reward_model.score(prompts, sft_texts, batch_size).float().tolist()
        pol_rewards = reward_model.score(prompts, pol_texts, batch_size).float().tolist()
        metrics.update({"eval/reward_sft": statistics.fmean(sft_rewards),
                        "eval/reward_policy": statistics.fmean(pol_rewards)})
    metrics.update({
        "eval/kl": statistics.fmean(seq_kl),
        "eval/eos_rate_sft": statistics.fmean(eos["sft"]),
        "eval/eos_rate_policy": statistics.fmean(eos["policy"]),
        "eval/num_prompts": len(prompts),  # samples of each model: a small pool's prompts are drawn again
        "eval/distinct_prompts": len({json.dumps(p, sort_keys=True) for p in prompts}),
    })
    gold_sft = gold_pol = [None] * len(prompts)
    if judge is not None:
        gold_sft = [judge(p, r) for p, r in zip(prompts, sft_texts)]
        gold_pol = [judge(p, r) for p, r in zip(prompts, pol_texts)]
        metrics.update(gold_metrics(gold_sft, gold_pol))
    samples = [
        {"prompt": p, "sft_response": a, "policy_response": b, "sft_reward": ra, "policy_reward": rb,
         "sft_gold": ga, "policy_gold": gb, "policy_kl": k}
        for p, a, b, ra, rb, ga, gb, k in zip(prompts, sft_texts, pol_texts, sft_rewards, pol_rewards,
                                              gold_sft, gold_pol, seq_kl)
    ]
    return metrics, samples


def gold_metrics(gold_sft: list[float], gold_pol: list[float]) -> dict[str, float]:
    """Mean judge scores and the policy's gain in units of the SFT samples' standard deviation."""
    metrics = {
        "eval/gold_sft": statistics.fmean(gold_sft),
        "eval/gold_policy": statistics.fmean(gold_pol),
        "eval/gold_sft_std": statistics.stdev(gold_sft) if len(gold_sft) > 1 else 0.0,
    }
    metrics["eval/gold_gain_in_sft_std"] = (
        (metrics["eval/gold_policy"] - metrics["eval/gold_sft"]) / metrics["eval/gold_sft_std"]
        if metrics["eval/gold_sft_std"] > 0 else 0.0)
    return metrics



KL_BUDGET_OVERRUN = 1.5  # a held-out KL this many times kl.target is said at the end of a run


def kl_budget_note(summary: dict[str, Any], target: float, adaptive: bool, coef: float) -> str | None:
    """One line when the held-out KL (eval/kl) passed KL_BUDGET_OVERRUN x the budget `target`, or
    None. A run that drifts past its budget still exits 0 (its samples may be what the user wants),
    so the line says it and what holds the KL: a fixed coefficient does not react to the KL, the
    adaptive one (Ziegler et al. 2019, section 2.2) reacts over `kl.horizon` episodes."""
    kl = summary.get("eval/kl")
    if kl is None or kl <= KL_BUDGET_OVERRUN * target:
        return None
    holds = (f"the coefficient is fixed (kl.adaptive=false, kl.coef={coef:g}): raise kl.coef, set kl.adaptive=true "
             "or stop earlier" if not adaptive else
             f"the adaptive coefficient (now {summary.get('objective/kl_coef', coef):.3g}) did not bring it back: "
             "a shorter kl.horizon reacts faster")
    return (f"note: the policy's KL to the reference on the held-out prompts is {kl:.2f} nats per sequence, "
            f"{kl / target:.1f}x the budget kl.target={target:g}; {holds}")

class PolicySampler:
    """A LoRA policy (a PeftModel on the SFT checkpoint) as `evaluate` reads it: samples from the
    policy or, adapter disabled, the SFT model, through PPO's rollout engine (`ppo.sampling`),
    with the log-probs of both. For runs without PPO's trainer: DPO, and adapters trained elsewhere."""

    def __init__(self, policy: Any, tokenizer: Any, *, temperature: float, response_length: int,
                 max_prompt_length: int, chunk_tokens: int = 0):
        from ppo.model import ActorCritic, Reference

        self.model = ActorCritic(policy, value_head=False)
        self.reference = Reference(self.model)
        self.tokenizer = tokenizer
        self.temperature, self.response_length = temperature, response_length
        self.max_prompt_length, self.chunk_tokens = max_prompt_length, chunk_tokens

    @torch.no_grad()
    def generate(self, prompts: list, adapter: bool = True) -> Any:
        import contextlib

        from ppo.experience import Samples, encode_prompts
        from ppo.sampling import sample_responses

        tok = self.tokenizer
        query_ids, query_mask = encode_prompts(tok, prompts, self.max_prompt_length, next(self.model.parameters()).device)
        with contextlib.nullcontext() if adapter else self.model.adapter_disabled():
            response, logprobs, _ = sample_responses(
                self.model, query_ids, query_mask, max_new_tokens=self.response_length, temperature=self.temperature,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        response_ids, response_mask = core.truncate_after_eos(response, tok.eos_token_id, tok.pad_token_id)
        return Samples(query_ids, query_mask, response_ids, response_mask, logprobs * response_mask, None)

    def decode(self, response_ids: torch.Tensor, response_mask: torch.Tensor) -> list[str]:
        from ppo.experience import decode_responses

        return decode_responses(self.tokenizer, response_ids, response_mask)

    @torch.no_grad()
    def reference_logprobs(self, samples: Any) -> torch.Tensor:
        return self.reference.logprobs(samples.input_ids, samples.attention_mask, samples.context_length,
                                       samples.response_ids, self.temperature, self.chunk_tokens)

    @torch.no_grad()
    def sampled_logprobs(self, samples: Any) -> torch.Tensor:
        """log pi of the sampled tokens as the reference's are computed (a full forward), so that their
        difference is the adapter's alone: in fp32 the sampler's own (equal to rounding), in bf16
        the cached decoding differs by more than the KL being measured early in training."""
        from ppo.sampling import samples_exactly

        if samples_exactly(self.model):
            return samples.logprobs
        logprobs = self.model.policy_logprobs(samples.input_ids, samples.attention_mask, samples.context_length,
                                              samples.response_ids, self.temperature, self.chunk_tokens)
        return core.zero_masked(logprobs, samples.response_mask)
