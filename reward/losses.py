"""The reward model's loss: pure functions on reward tensors, no model, no data loading.

InstructGPT (Ouyang et al. 2022, eq. 1) trains on a labeler's whole ranking of K responses:

    loss(theta) = -1/C(K,2) * E_{(x, y_w, y_l) ~ D} [ log sigmoid(r(x, y_w) - r(x, y_l)) ]

where every one of the C(K,2) ordered pairs the ranking implies is one term, and one ranking
is one batch element (each response forwarded once). Ties imply no pair. We add two options:

- `margin`: -log sigmoid(r_w - r_l - margin) asks the winner to beat the loser by a margin
  (as in Llama 2's reward model, here a constant);
- `center_coef`: the reward-centering term of Eisenstein et al. 2023 ("Helping or Herding?",
  eq. 2), center_coef * (r_w + r_l)^2 per pair, averaged as the ranking loss averages its pairs:
  it pulls each prompt's rewards to sum to zero (the pairwise loss only sees differences, so
  their level is otherwise free to drift) without shrinking the margins between them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(r_w: torch.Tensor, r_l: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """(P,) -log sigmoid(r_w - r_l - margin), one value per ordered pair."""
    return -F.logsigmoid(r_w - r_l - margin)


def per_ranking_mean(per_pair: torch.Tensor, pair_group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(G,) the mean of `per_pair` (P,) over each ranking's pairs (`pair_group`: 0..G-1 per pair)."""
    zeros = torch.zeros(num_groups, dtype=per_pair.dtype, device=per_pair.device)
    return zeros.index_add(0, pair_group, per_pair) / zeros.index_add(0, pair_group, torch.ones_like(per_pair))


def kwise_ranking_loss(
    rewards: torch.Tensor,  # (N,) reward of every response in the batch (all rankings flattened)
    winners: torch.Tensor,  # (P,) index into `rewards` of each pair's preferred response
    losers: torch.Tensor,  # (P,) index into `rewards` of each pair's rejected response
    pair_group: torch.Tensor,  # (P,) index of the ranking each pair comes from, 0..G-1
    num_groups: int,  # G, rankings in the batch (each has at least one pair)
    margin: float = 0.0,
) -> torch.Tensor:
    """InstructGPT's loss: mean over rankings of the mean over each ranking's pairs.

    Averaging per ranking first (the 1/C(K,2) of eq. 1) weighs every ranking equally,
    whatever its K, instead of letting a K=9 ranking (36 pairs) outweigh a K=2 one (1 pair).
    """
    per_pair = pairwise_loss(rewards[winners], rewards[losers], margin)  # (P,)
    return per_ranking_mean(per_pair, pair_group, num_groups).mean()


def reward_centering_loss(rewards: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor, pair_group: torch.Tensor,
                          num_groups: int, center_coef: float) -> torch.Tensor:
    """Eisenstein et al. 2023, eq. 2: center_coef * (r_w + r_l)^2 for each pair, averaged like
    `kwise_ranking_loss` (over each ranking's pairs, then over rankings); for K = 2 it is TRL's
    `center_rewards_coefficient` term."""
    per_pair = (rewards[winners] + rewards[losers]).pow(2)  # (P,)
    return center_coef * per_ranking_mean(per_pair, pair_group, num_groups).mean()


def pair_accuracy(r_w: torch.Tensor, r_l: torch.Tensor) -> torch.Tensor:
    """(P,) 1 where the preferred response scores higher, 0.5 on an exact tie, else 0."""
    return (r_w > r_l).float() + 0.5 * (r_w == r_l).float()
