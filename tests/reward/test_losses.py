"""The ranking loss on 3-element tensors, values worked out by hand."""

import math

import pytest
import torch

from align.formats import ordered_pairs
from reward.losses import kwise_ranking_loss, pair_accuracy, pairwise_loss, per_ranking_mean, reward_centering_loss


def nll(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x))."""
    return math.log1p(math.exp(-x))


def test_ordered_pairs_follow_ranks_and_ties_imply_none():
    assert ordered_pairs([0, 2, 1]) == [(0, 1), (0, 2), (2, 1)]
    assert ordered_pairs([1, 0, 1]) == [(1, 0), (1, 2)]  # responses 0 and 2 tie: no pair between them
    assert ordered_pairs([0, 0, 0]) == []


def test_per_ranking_mean_averages_each_rankings_pairs():
    # pairs 0-2 from ranking 0 (mean of 1, 2, 6 = 3), pair 3 from ranking 1, pairs 4-5 from ranking 2
    per_pair = torch.tensor([1.0, 2.0, 6.0, -4.0, 0.5, 1.5])
    means = per_ranking_mean(per_pair, torch.tensor([0, 0, 0, 1, 2, 2]), 3)
    torch.testing.assert_close(means, torch.tensor([3.0, -4.0, 1.0]))


def test_kwise_loss_one_ranking_of_three():
    # rewards r = [2, 0, 1], ranks [0, 2, 1] (0 best): pairs (0>1), (0>2), (2>1)
    # differences r_w - r_l: 2, 1, 1 -> loss = (nll(2) + nll(1) + nll(1)) / 3
    #                                        = (0.126928 + 0.313262 + 0.313262) / 3 = 0.251151
    r = torch.tensor([2.0, 0.0, 1.0])
    w, l = torch.tensor([0, 0, 2]), torch.tensor([1, 2, 1])
    loss = kwise_ranking_loss(r, w, l, torch.tensor([0, 0, 0]), num_groups=1)
    assert loss.item() == pytest.approx((nll(2) + nll(1) + nll(1)) / 3, abs=1e-6)
    assert loss.item() == pytest.approx(0.251151, abs=1e-5)


def test_kwise_loss_weighs_rankings_equally_not_pairs():
    # two rankings in one batch, K = 2 and K = 3:
    # group 0: pair (0>1) with r = [1, 0] -> nll(1) = 0.313262
    # group 1: pairs (2>3), (2>4), (3>4) on r = [0, 0, 0] -> each nll(0) = log 2 = 0.693147
    # per-ranking mean: (0.313262 + 0.693147) / 2 = 0.503204; a mean over the 4 pairs would give 0.598176
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0])
    w, l, g = torch.tensor([0, 2, 2, 3]), torch.tensor([1, 3, 4, 4]), torch.tensor([0, 1, 1, 1])
    loss = kwise_ranking_loss(r, w, l, g, num_groups=2)
    assert loss.item() == pytest.approx((nll(1) + math.log(2)) / 2, abs=1e-6)
    assert loss.item() != pytest.approx((nll(1) + 3 * math.log(2)) / 4, abs=1e-3)


def test_margin_shifts_the_difference():
    # r_w - r_l = 1 with margin 1 -> -log sigmoid(0) = log 2 = 0.693147
    assert pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0).item() == pytest.approx(math.log(2))
    # margin 0: nll(1) = 0.313262
    assert pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(0.313262, abs=1e-6)


def test_reward_centering_term_is_eisenstein_per_pair_averaged_per_ranking():
    # ranking 0: rewards [1, -2, 3] ranked in that order, pairs (0,1) (0,2) (1,2): (r_w + r_l)^2 = 1, 16, 1,
    # mean 6; ranking 1: rewards [0.5, -0.5], one pair summing to 0. Mean over rankings 3; coef 0.01 -> 0.03.
    rewards = torch.tensor([1.0, -2.0, 3.0, 0.5, -0.5])
    winners, losers, group = torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4]), torch.tensor([0, 0, 0, 1])
    assert reward_centering_loss(rewards, winners, losers, group, 2, 0.01).item() == pytest.approx(0.03)
    # K = 2 pairs: TRL's center_rewards_coefficient * mean((r_chosen + r_rejected)^2); a margin costs nothing
    pairs = torch.tensor([2.0, -2.0, 5.0, -4.0])
    two = reward_centering_loss(pairs, torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([0, 1]), 2, 0.5)
    assert two.item() == pytest.approx(0.5 * (0.0 + 1.0) / 2)


def test_gradient_pushes_winner_up_and_loser_down():
    r = torch.tensor([0.0, 0.0, 0.0], requires_grad=True)
    kwise_ranking_loss(r, torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]), torch.tensor([0, 0, 0]), 1).backward()
    # d/dr of mean of nll(r_w - r_l) at 0: each pair gives -1/2 to the winner, +1/2 to the loser, / 3 pairs
    # response 0 wins twice: -1/3; response 1 wins once, loses once: 0; response 2 loses twice: +1/3
    assert r.grad.tolist() == pytest.approx([-1 / 3, 0.0, 1 / 3])


def test_pair_accuracy_counts_ties_half():
    assert pair_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])).tolist() == [1.0, 0.0, 0.5]
