"""Pair outcomes per ranking, the ranking-level bootstrap interval, the 'longer wins' baseline."""

from align.formats import Ranking
from reward.evaluate import bootstrap_interval, length_rewards, pair_outcomes, text_key


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
