"""DPO's loss on whole rankings: pure functions on tensors, no model, no data loading.

DPO (Rafailov et al. 2023) reads a policy's implicit reward of a response off its log-probability
ratio to the reference, r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), and fits it to the
preferences by maximum likelihood. Appendix A.3 derives the case of a ranking of K responses under
the Plackett-Luce model: the ranking y_1 > y_2 > ... > y_K has probability

    P(ranking) = prod_{k=1}^{K-1} exp(r(x, y_k)) / sum_{j >= k} exp(r(x, y_j)),

the product over positions of a softmax over the responses not yet placed. For K = 2 this is
sigmoid(r_w - r_l), DPO's pairwise loss. One ranking is one observation; cutting it into its
C(K, 2) pairs (as TRL, OpenRLHF and the rest do) counts one annotator's judgement many times
over, as if the pairs were independent.

Ties. The annotation app lets an annotator put responses in a tie (and a top-m ranking leaves its
unranked rest as one group): the annotator states no order among them. The exact likelihood of
"these d responses take the next d places in some order" sums the Plackett-Luce probability over
the d! orders; we use Efron's approximation of it (Efron 1977, the default tie handling of Cox
regression in R's survival and in lifelines), which approximates the mean over the orders (the sum
divided by the constant d!) by averaged denominators: the m-th member (m = 0 .. d-1) of a tied
group G, with O the responses ranked below G, contributes

    r_i - log( sum_O exp(r) + (1 - m/d) * sum_G exp(r) ).

With no tie (d = 1) this is the softmax term above. Breslow's cruder form (every tied member over
the whole remaining set) overstates the evidence as d grows. The last group of a ranking (the
bottom response, or a bottom tie, or a top-m ranking's unranked rest) is placed with certainty
once the groups above it are, so it contributes nothing: a tie says nothing about order within it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EMPTY = -1e9  # stands for log 0 in masked log-sum-exps: finite, so empty sets give no NaN gradients


def implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)) of whole responses: (...,) -> (...,)."""
    return beta * (policy_logps - reference_logps)


def plackett_luce_nll(rewards: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each ranking under Plackett-Luce with Efron's ties: (G,) per ranking.

    rewards (G, K): each response's (implicit) reward; ranks (G, K): 0 = best, equal ranks tie;
    valid (G, K): False where a ranking of fewer than K responses is padded (those are ignored).
    """
    r = rewards.float()
    ranks_i, ranks_j = ranks.unsqueeze(2), ranks.unsqueeze(1)  # (G, K, 1), (G, 1, K)
    other_valid = valid.unsqueeze(1)
    same_group = (ranks_j == ranks_i) & other_valid  # (G, K, K): j is in i's (tied) group
    below = (ranks_j > ranks_i) & other_valid  # (G, K, K): j is ranked below i's group
    group_size = same_group.sum(-1)  # d
    earlier = torch.ones_like(same_group[0], dtype=torch.bool).tril(-1)  # (K, K): j < i
    position_in_group = (same_group & earlier).sum(-1)  # m, 0 .. d - 1
    r_j = r.unsqueeze(1).expand_as(same_group)
    log_group = torch.logsumexp(torch.where(same_group, r_j, _EMPTY), -1)  # log sum_G exp(r)
    log_below = torch.logsumexp(torch.where(below, r_j, _EMPTY), -1)  # log sum_O exp(r)
    remaining_share = torch.log1p(-position_in_group / group_size.clamp(min=1))  # log(1 - m/d)
    log_denominator = torch.logaddexp(remaining_share + log_group, log_below)
    placed = valid & below.any(-1)  # every group but the last one
    return -((r - log_denominator) * placed).sum(-1)


def dpo_pair_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                  reference_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's loss of preference pairs (Rafailov et al. 2023, eq. 7), one value per pair:
    -log sigmoid(beta * ((log pi_w - log ref_w) - (log pi_l - log ref_l)))."""
    margin = implicit_rewards(policy_chosen, reference_chosen, beta) - implicit_rewards(policy_rejected,
                                                                                         reference_rejected, beta)
    return -F.logsigmoid(margin)
