"""Plackett-Luce DPO on 3-element tensors; every expected value is worked out beside it."""

from __future__ import annotations

import itertools
import math

import torch

from dpo.losses import dpo_pair_loss, implicit_rewards, plackett_luce_nll


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=0)


def lse(*xs):
    return math.log(sum(math.exp(x) for x in xs))


def nll(rewards, ranks, valid=None):
    rewards, ranks = torch.tensor([rewards]), torch.tensor([ranks])
    valid = torch.ones_like(ranks, dtype=torch.bool) if valid is None else torch.tensor([valid])
    return plackett_luce_nll(rewards, ranks, valid)[0]


def test_full_ranking_is_the_product_of_softmaxes_over_the_responses_left():
    # ranks (1, 0, 2): response 1 first, then 0, then 2. r = (0.5, 2, -1):
    # P = e^2 / (e^0.5 + e^2 + e^-1) * e^0.5 / (e^0.5 + e^-1) * 1
    r = [0.5, 2.0, -1.0]
    expected = -((2.0 - lse(0.5, 2.0, -1.0)) + (0.5 - lse(0.5, -1.0)))
    close(nll(r, [1, 0, 2]), expected)
    # the same as the product of softmaxes computed with torch, position by position
    rt = torch.tensor(r)
    p = torch.softmax(rt[[1, 0, 2]], 0)[0] * torch.softmax(rt[[0, 2]], 0)[0]
    close(nll(r, [1, 0, 2]), -torch.log(p))
    # a proper distribution: the 3! orders' probabilities sum to 1
    total = sum(math.exp(-nll(r, list(order)).item()) for order in itertools.permutations(range(3)))
    close(total, 1.0)


def test_two_responses_give_exactly_dpos_loss():
    # K = 2: -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l))), pi = (-3, -5), ref = (-4, -4), beta 0.5
    # implicit rewards 0.5 * (1, -1) = (0.5, -0.5): -log sigmoid(1) = log(1 + e^-1)
    pi, ref = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    rewards = implicit_rewards(pi, ref, 0.5)
    close(rewards, [0.5, -0.5])
    close(nll(rewards.tolist(), [0, 1]), math.log(1 + math.exp(-1)))
    close(dpo_pair_loss(pi[0], pi[1], ref[0], ref[1], 0.5), math.log(1 + math.exp(-1)))


def test_a_top_tie_uses_efrons_averaged_denominators():
    # ranks (0, 0, 1): responses 0 and 1 tie above 2. r = (1, 0, 2). Efron, d = 2:
    # m = 0: r_0 - log(e^2 + e^1 + e^0); m = 1: r_1 - log(e^2 + 0.5 * (e^1 + e^0)); the last group adds nothing
    r = [1.0, 0.0, 2.0]
    expected = -((1.0 - lse(2.0, 1.0, 0.0)) + (0.0 - math.log(math.exp(2) + 0.5 * (math.e + 1))))
    close(nll(r, [0, 0, 1]), expected)
    # the tie is symmetric: swapping the tied responses' rewards changes nothing
    close(nll([0.0, 1.0, 2.0], [0, 0, 1]), expected)
    # and close to the exact likelihood averaged over the pair's 2 orders (the sum over the orders
    # divided by d! = 2, a constant that moves no gradient): 0.02646 against 0.02669
    mean_of_orders = (math.exp(-nll(r, [0, 1, 2]).item()) + math.exp(-nll(r, [1, 0, 2]).item())) / 2
    assert abs(math.exp(-expected) - mean_of_orders) / mean_of_orders < 0.02


def test_the_last_group_says_nothing_about_its_own_order():
    # a bottom tie (or a top-m ranking's unranked rest): ranks (0, 1, 1) with r = (3, a, b) is
    # -(3 - log(e^3 + e^a + e^b)) whatever the split of a and b ... as long as their exp-sum is fixed
    a = nll([3.0, 0.0, 0.0], [0, 1, 1])
    b = nll([3.0, math.log(1.5), math.log(0.5)], [0, 1, 1])
    close(a, -(3.0 - lse(3.0, 0.0, 0.0)))
    close(a, b)
    # every response tied: no preference, no loss
    close(nll([3.0, -1.0, 0.2], [0, 0, 0]), 0.0)


def test_padding_is_ignored_and_rankings_of_different_k_share_a_batch():
    # ranking A has K = 3, ranking B has K = 2 padded to 3 with a garbage reward
    rewards = torch.tensor([[0.5, 2.0, -1.0], [1.0, -1.0, 100.0]])
    ranks = torch.tensor([[1, 0, 2], [0, 1, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    out = plackett_luce_nll(rewards, ranks, valid)
    close(out[0], nll([0.5, 2.0, -1.0], [1, 0, 2]))
    close(out[1], math.log(1 + math.exp(-2.0)))  # -log sigmoid(1 - (-1))


def test_gradient_raises_the_better_response_and_is_finite_with_ties_and_padding():
    rewards = torch.zeros(2, 3, requires_grad=True)
    ranks = torch.tensor([[0, 1, 2], [0, 0, 0]])
    valid = torch.tensor([[True, True, True], [True, True, False]])
    plackett_luce_nll(rewards, ranks, valid).sum().backward()
    grad = rewards.grad
    assert torch.isfinite(grad).all()
    assert grad[0, 0] < grad[0, 1] < grad[0, 2]  # descending the loss raises r_0 most, r_2 least
    close(grad[1], [0.0, 0.0, 0.0])  # an all-tied ranking pulls on nothing


def test_a_top_m_ranking_contributes_its_ranked_prefix_and_nothing_about_the_rest():
    from align.formats import Ranking

    # top-2 of 4 from the annotation app: response 0 first, 2 second, 1 and 3 unranked below them
    ranking = Ranking(prompt="p", responses=["a", "b", "c", "d"], ranks=[0, 2, 1, 2], ranked=2)
    r = [1.0, 0.3, -0.5, 2.0]
    # P = e^1 / (e^1 + e^0.3 + e^-0.5 + e^2) * e^-0.5 / (e^0.3 + e^-0.5 + e^2); the unranked pair adds nothing
    expected = -((1.0 - lse(1.0, 0.3, -0.5, 2.0)) + (-0.5 - lse(0.3, -0.5, 2.0)))
    close(nll(r, ranking.ranks), expected)
    close(nll([1.0, 2.0, -0.5, 0.3], ranking.ranks), expected)  # swapping the unranked responses changes nothing
