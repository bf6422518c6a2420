"""Pair outcomes per ranking, the ranking-level bootstrap interval, the 'longer wins' baseline, agreement
between annotators and with the model on pairs several annotators judged."""

import math

import pytest

from align.formats import Ranking
from reward.evaluate import (
    bootstrap_interval,
    cross_annotator_metrics,
    length_rewards,
    outcomes_by_prompt,
    pair_outcomes,
    ranking_metrics,
    text_key,
)


def test_pair_outcomes_per_ranking_with_ties_as_half():
    r = Ranking(prompt="p", responses=["a", "bb", "ccc"], ranks=[0, 1, 2])
    rewards = {text_key("p", "a"): 2.0, text_key("p", "bb"): 2.0, text_key("p", "ccc"): 3.0}
    # pairs (a > bb): tie -> 0.5; (a > ccc): wrong -> 0; (bb > ccc): wrong -> 0
    assert sorted(pair_outcomes([r], rewards)[0]) == [0.0, 0.0, 0.5]


def test_longer_wins_baseline():
    r = Ranking(prompt="p", responses=["short", "a longer one"], ranks=[1, 0])
    assert pair_outcomes([r], length_rewards([r])) == [[1.0]]


def test_bootstrap_interval_is_degenerate_without_spread_and_brackets_the_mean():
    assert bootstrap_interval([[1.0]] * 20) == (1.0, 1.0)
    groups = [[1.0]] * 60 + [[0.0]] * 40  # accuracy 0.6 on 100 independent pairs: about +-0.096
    lo, hi = bootstrap_interval(groups, seed=1)
    assert lo < 0.6 < hi and 0.15 < hi - lo < 0.25


def test_bootstrap_resamples_rankings_so_correlated_pairs_widen_the_interval():
    independent = [[1.0]] * 60 + [[0.0]] * 40
    clustered = [[1.0] * 10] * 6 + [[0.0] * 10] * 4  # the same 100 pairs in 10 rankings of 10 pairs
    (lo_i, hi_i), (lo_c, hi_c) = bootstrap_interval(independent, seed=1), bootstrap_interval(clustered, seed=1)
    assert hi_c - lo_c > 2 * (hi_i - lo_i)


def test_outcomes_are_pooled_per_held_out_prompt_as_the_split_draws_it():
    # Two ranked groups of one conversation tree (same first user turn, deeper turns differ), one
    # ranking of the same question as plain text, and another question: two prompts, as prompt_key splits.
    tree_root = [{"role": "user", "content": "q1"}]
    deeper = tree_root + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "more?"}]
    rankings = [Ranking(prompt=tree_root, responses=["x", "y"], ranks=[0, 1]),
                Ranking(prompt="q2", responses=["x", "y"], ranks=[0, 1]),
                Ranking(prompt=deeper, responses=["x", "y", "z"], ranks=[0, 1, 2]),
                Ranking(prompt="q1", responses=["x", "y"], ranks=[1, 0])]
    outcomes = [[1.0], [0.0], [1.0, 0.5, 0.0], [0.5]]
    assert outcomes_by_prompt(rankings, outcomes) == [[1.0, 1.0, 0.5, 0.0, 0.5], [0.0]]


def test_cross_annotator_agreement_with_ties_as_half():
    # Two annotators rank the same 3 responses: ann1 a > b > c, ann2 b > a > c (they agree on 2 of 3 pairs).
    # A third ranks a prompt nobody else saw (left out). The model: a 3, b 1, c 1 (b and c tied).
    ranks = {"ann1": [0, 1, 2], "ann2": [1, 0, 2]}
    rankings = [Ranking(prompt="p", responses=["a", "b", "c"], ranks=r, annotator=name) for name, r in ranks.items()]
    rankings.append(Ranking(prompt="q", responses=["x", "y"], ranks=[0, 1], annotator="ann3"))
    rewards = {text_key("p", "a"): 3.0, text_key("p", "b"): 1.0, text_key("p", "c"): 1.0,
               text_key("q", "x"): 0.0, text_key("q", "y"): 1.0}
    m = cross_annotator_metrics(rankings, rewards, "eval/")
    assert m["eval/cross_annotator_num_pairs"] == 3
    assert m["eval/annotator_agreement"] == 2 / 3
    # model vs each vote: (a, b): a above b, right for ann1 (1), wrong for ann2 (0); (a, c): right twice
    # (1, 1); (b, c): a tie, half for each (0.5, 0.5): 4 of 6
    assert m["eval/cross_annotator_accuracy"] == 4 / 6
    # a response ranked by one annotator only gives nothing to compare
    assert cross_annotator_metrics(rankings[2:], rewards, "eval/") == {}


def test_ranking_metrics_margin_is_winner_minus_loser_scaled_by_the_gain():
    # one ranking, a over b; rewards a 2.0, b 0.5: margin 2.0 - 0.5 = 1.5, the pair right
    r = Ranking(prompt="q", responses=["a", "b"], ranks=[0, 1])
    rewards = {text_key("q", "a"): 2.0, text_key("q", "b"): 0.5}
    m = ranking_metrics([r], rewards)
    assert m["eval/accuracy"] == 1.0 and m["eval/num_pairs"] == 1
    assert m["eval/reward_margin"] == pytest.approx(1.5)
    assert m["eval/loss"] == pytest.approx(math.log(1 + math.exp(-1.5)))  # -log sigmoid(1.5)
    assert ranking_metrics([r], rewards, margin_scale=2.0)["eval/reward_margin"] == pytest.approx(3.0)
    # the same ranking read the other way round: the margin changes sign, the accuracy drops to 0
    flipped = ranking_metrics([Ranking(prompt="q", responses=["a", "b"], ranks=[1, 0])], rewards)
    assert flipped["eval/reward_margin"] == pytest.approx(-1.5) and flipped["eval/accuracy"] == 0.0
    # a model that scores both alike has no preference: half a pair, not a win (a constant head is at chance)
    tied = ranking_metrics([r], {text_key("q", "a"): 1.0, text_key("q", "b"): 1.0})
    assert tied["eval/accuracy"] == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bootstrap_statistic_pools_the_pairs_of_the_drawn_groups(seed):
    # groups A = [1, 1, 1] and B = [0]; a resample of two groups is AA (1/4 of draws), AB or BA (1/2), BB (1/4).
    # Pooled pair accuracy: AA 6/6 = 1, AB 3/4 = 0.75, BB 0/2 = 0, so the median draw is 0.75; a mean of the
    # groups' means would give AB (1 + 0) / 2 = 0.5. At level 0 both ends of the interval are the median.
    assert bootstrap_interval([[1.0, 1.0, 1.0], [0.0]], level=0.0, seed=seed) == (0.75, 0.75)
    # and the 95% interval spans the extreme draws
    assert bootstrap_interval([[1.0, 1.0, 1.0], [0.0]], seed=seed) == (0.0, 1.0)
