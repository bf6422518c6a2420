"""The math of PPO for language models, as small pure functions on tensors.

Shapes: B = episodes in the batch, T = response tokens (right-padded after the first eos),
V = vocabulary. `mask` is (B, T) with 1 for real response tokens (up to and including eos).
Each function is tested on 3-element tensors in tests/ppo/test_core.py.

References: Ziegler et al. 2019 (KL-penalised reward, adaptive KL controller), Schulman et
al. 2016 (GAE), Schulman et al. 2017 (clipped surrogate), Huang et al. 2024 ("The N+
implementation details of RLHF with PPO": score at the last token, whitening, value clipping),
Ahmadian et al. 2024 (RLOO's leave-one-out baseline), Shao et al. 2024 (GRPO's group-normalised
advantages).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- log-probs


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) under softmax(logits / temperature): (B, T, V), (B, T) -> (B, T).

    Sampling used the same temperature, so these are the log-probs of the distribution the
    tokens were actually drawn from (implementation detail: temperature-consistent log-probs).
    """
    return gather_logprobs(log_softmax(logits, temperature), tokens)


def logprobs_from_hidden(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token) (and the entropy) from the states before the tokens and the output layer,
    without the whole (B, T, V) fp32 logits tensor: (B, T, H), (B, T) -> (B, T), (B, T) or None.

    `head` maps (N, H) states to (N, V) logits (the lm_head). The B * T positions go through it
    `chunk_tokens` at a time (0: all at once, the plain computation); under autograd each chunk's
    logits are recomputed in the backward (activation checkpointing), so a chunk's (chunk, V)
    logits and log-softmax are the largest tensors alive. At V = 152k, 16 x 1,024 tokens of fp32
    logits are 10 GB; a 4,096-token chunk is 2.5 GB.
    """
    B, T = tokens.shape
    flat_hidden, flat_tokens = hidden.reshape(B * T, hidden.shape[-1]), tokens.reshape(B * T)
    if chunk_tokens <= 0 or B * T <= chunk_tokens:
        logp, entropy = _chunk_logprobs(flat_hidden, flat_tokens, head, temperature, with_entropy)
    else:
        from torch.utils.checkpoint import checkpoint

        recompute = torch.is_grad_enabled()
        pieces = [checkpoint(_chunk_logprobs, h, t, head, temperature, with_entropy, use_reentrant=False)
                  if recompute else _chunk_logprobs(h, t, head, temperature, with_entropy)
                  for h, t in zip(flat_hidden.split(chunk_tokens), flat_tokens.split(chunk_tokens))]
        logp = torch.cat([p[0] for p in pieces])
        entropy = torch.cat([p[1] for p in pieces]) if with_entropy else None
    return logp.view(B, T), (entropy.view(B, T) if with_entropy else None)


def _chunk_logprobs(hidden: torch.Tensor, tokens: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                    temperature: float, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    logp = log_softmax(head(hidden), temperature)
    return gather_logprobs(logp, tokens), (_entropy(logp) if with_entropy else None)


def log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) over the vocabulary, in fp32 (or wider): (..., V) -> (..., V)."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def gather_logprobs(logp: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The entries of `logp` (..., V) at `tokens` (...,) -> (...,)."""
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- masked statistics


def zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` where `mask` is 1, else 0. Selected, not multiplied by the mask: a padding token's log-prob
    may be -inf, and -inf * 0 is NaN."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of the entries where `mask` is 1; an inf or NaN at a masked-out entry does not reach it."""
    kept = zero_masked(x, mask)
    count = mask.to(x.dtype)
    if dim is None:
        return kept.sum() / count.sum().clamp(min=1)
    return kept.sum(dim) / count.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (n - 1) variance of the masked entries."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x - mean) / std over the masked entries; masked-out entries come back as 0.

    `all_sum` sums a tensor over the processes: the mean and the unbiased variance are then those of
    every process's entries together, so that several processes whiten their shares of a batch as
    one process whitens the whole batch (OpenRLHF normalises advantages over the data-parallel
    group the same way)."""
    if all_sum is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        m = mask.to(x.dtype)
        total, n = all_sum(torch.stack([zero_masked(x, mask).sum(), m.sum()]).double()).unbind()
        mean = (total / n.clamp(min=1)).to(x.dtype)
        squares = all_sum(zero_masked((x - mean) ** 2, mask).sum().double().reshape(1))[0]
        var = (squares / (n - 1).clamp(min=1)).to(x.dtype)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return zero_masked(whitened, mask)


# ----------------------------------------------------------------------------- rewards


# k3's bounds, verl's (`kl_penalty`, low_var_kl, in verl/trainer/ppo/core_algos.py): the log-ratio is
# clamped to +-20 before the exponential, the estimate to at most 10 nats a token. k3 grows as
# e^{-log ratio}, and a low sampling temperature scales the log-ratios up (the logits of both models are
# divided by it): at temperature 0.05 the demo's GRPO KL loss was 1.4e7 in its first iteration, its
# gradient norm 3e8. A k3 under 10 (log pi - log pi_ref between -2.6 and 11) is unchanged; past it the
# token's estimate is 10 and its gradient 0, as in verl (OpenRLHF's compute_approx_kl, in the versions
# with its clamp, bounds every estimate to +-10 likewise).
K3_LOG_RATIO_BOUND = 20.0
K3_BOUND = 10.0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: Literal["k1", "k3"],
               mask: torch.Tensor | None = None, *, bounded: bool = True) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi: (B, T), (B, T) -> (B, T), 0 where
    `mask` (B, T) is 0.

    k1 = log pi - log pi_ref; k3 = (r - 1) - log r with r = pi_ref / pi (Schulman 2020), at most
    K3_BOUND (above). Both average to the true KL over samples (k3 within its bound); k3 is never
    negative. Padding is cut before the exponential: a pad token's log-prob of -100 under one model and
    0 under the other would give k3 = e^100 - 101, an inf that a later multiplication by the mask turns
    into NaN, gradient included.
    The bound holds where k3 trains: GRPO's KL loss and the per-token penalty in the reward (PPO, RLOO
    with kl.estimator=k3). `bounded=False`: k3 as it is, for a measurement (the evaluation's KL), which
    a bound would read low.
    """
    log_ratio = logprobs - ref_logprobs
    if mask is not None:
        log_ratio = log_ratio.masked_fill(mask == 0, 0.0)
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        # clamped first, so that the exponential stays finite: an inf there would meet the outer clamp's
        # zero gradient as inf * 0 = NaN
        if not bounded:
            return torch.expm1(-log_ratio) + log_ratio
        log_ratio = log_ratio.clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
        return (torch.expm1(-log_ratio) + log_ratio).clamp(max=K3_BOUND)
    raise ValueError(f"unknown KL estimator {estimator!r}")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row: (B, T) -> (B,). Rows with no token give 0."""
    return (mask.long().sum(-1) - 1).clamp(min=0)


def compute_rewards(
    kl: torch.Tensor, scores: torch.Tensor, kl_coef: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards -beta * KL, plus the reward-model score at the last real token.

    Returns (rewards (B, T), non_score_reward (B, T)), zero at masked-out positions
    (Ziegler et al. 2019 eq. 2; InstructGPT eq. 2 with the score on the final token).
    """
    mask_f = mask.to(kl.dtype)
    non_score_reward = -kl_coef * kl * mask_f
    rewards = non_score_reward.clone()
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, last_token_index(mask)] += scores.to(kl.dtype)
    return rewards, non_score_reward


# ----------------------------------------------------------------------------- advantages


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), right to left.

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lambda * A_{t+1}.
    Past the last real token V and A are 0 (the episode has ended). Returns
    (advantages, returns = advantages + values), both (B, T) and zero where masked.
    """
    mask_f = mask.to(values.dtype)
    values = values * mask_f
    rewards = rewards * mask_f
    T = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * gae_lambda * next_advantage) * mask_f[:, t]
        advantages[:, t] = next_advantage
    return advantages, (advantages + values) * mask_f


def rloo_advantages(rewards: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, eq. 5): (B,) -> (B,).

    The B sequence rewards come in groups of k = samples_per_prompt consecutive rows, k samples
    of one prompt. Each sample's baseline is the mean reward of the OTHER k - 1 samples of its
    prompt, so it is independent of the sample itself and the estimate stays unbiased:
    A_i = r_i - 1/(k-1) * sum_{j != i} r_j  (= k/(k-1) * (r_i - mean_j r_j)).
    """
    k = samples_per_prompt
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).view(-1)


def grpo_advantages(rewards: torch.Tensor, samples_per_prompt: int, eps: float = 1e-4) -> torch.Tensor:
    """Group Relative Policy Optimization's outcome advantages (Shao et al. 2024, section 4.1.2):
    (B,) -> (B,), A_i = (r_i - mean(r)) / (std(r) + eps) within each group of k consecutive rows.

    std is the unbiased (k - 1) standard deviation, as DeepSeekMath's and TRL's implementations
    compute it; `eps` keeps a group whose samples all scored the same at A = 0.
    """
    grouped = rewards.view(-1, samples_per_prompt)
    mean = grouped.mean(-1, keepdim=True)
    std = grouped.std(-1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def frac_zero_spread(rewards: torch.Tensor, samples_per_prompt: int, rtol: float = 1e-6) -> torch.Tensor:
    """The fraction of the prompts whose k = samples_per_prompt samples (consecutive rows of (B,)
    `rewards`) all scored alike, to `rtol` of their size: their advantages are 0 under both
    baselines, so they teach the policy nothing (TRL's GRPO logs it as frac_reward_zero_std)."""
    grouped = rewards.view(-1, samples_per_prompt)
    spread = grouped.amax(-1) - grouped.amin(-1)
    return (spread <= rtol * grouped.abs().amax(-1).clamp(min=1.0)).float().mean()


def broadcast_to_tokens(sequence_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) one value per sequence -> (B, T) that value at every real token, 0 where masked: the
    critic-free methods give every token of a response its sequence's advantage."""
    return sequence_values.unsqueeze(-1) * mask.to(sequence_values.dtype)


# ----------------------------------------------------------------------------- losses


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (Schulman et al. 2017), as a loss to minimise, masked token mean.

    L = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))). Also returns the clip
    fraction and approx KL(old || new) = mean((ratio - 1) - log ratio).
    The log-ratio is 0 at masked-out positions before it is exponentiated: a padding token's
    log-prob may be -inf, and inf - inf under exp would send NaN through backward.
    """
    log_ratio = (logprobs - old_logprobs).masked_fill(mask == 0, 0.0)
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_coef, 1.0 + clip_coef)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approxkl": masked_mean((ratio - 1.0) - log_ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, vf_clip_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * mean(max((V - R)^2, (V_clipped - R)^2)), V_clipped within
    +-vf_clip_coef of the rollout's values (Huang et al. 2024, detail 'value clipping')."""
    clipped_values = old_values + (values - old_values).clamp(-vf_clip_coef, vf_clip_coef)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask)}
    return loss, stats


# ----------------------------------------------------------------------------- KL controllers


class FixedKLController:
    """beta stays where it was set."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_episodes: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, section 2.2: e = clip(KL / target - 1, -0.2, 0.2),
    beta <- beta * (1 + e * n_episodes / horizon), n_episodes the episodes of the batch."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        super().__init__(kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_episodes: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_episodes / self.horizon


# ----------------------------------------------------------------------------- responses


def truncate_after_eos(response_ids: torch.Tensor, eos_token_id: int, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first eos; pad the rest.

    Returns (response_ids with pad after the first eos, mask (B, T) of the kept tokens).
    A response without eos keeps all T tokens (it was cut at response_length).
    """
    T = response_ids.shape[1]
    is_eos = response_ids == eos_token_id
    first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(is_eos[:, 0], T, dtype=torch.long))
    mask = torch.arange(T, device=response_ids.device).unsqueeze(0) <= first_eos.unsqueeze(1)
    return torch.where(mask, response_ids, torch.full_like(response_ids, pad_token_id)), mask.long()
