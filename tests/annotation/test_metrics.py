"""Agreement metrics on small worked examples."""

from __future__ import annotations

import pytest

from annotation import metrics


def test_krippendorff_ordinal_matches_published_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", the 4 coders x 12 units
    # example with missing values; the paper reports alpha_ordinal = 0.815.
    n = None
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
        [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n],
    ]
    units = list(zip(*coders))
    assert metrics.krippendorff_alpha_ordinal(units) == pytest.approx(0.815, abs=5e-4)


def test_alpha_perfect_and_reversed():
    same = {"p": {"a": [0, 1, 2], "b": [0, 1, 2]}, "q": {"a": [2, 0, 1], "b": [2, 0, 1]}}
    assert metrics.alpha_for_rankings(same) == pytest.approx(1.0)
    opposite = {"p": {"a": [0, 1, 2], "b": [2, 1, 0]}}
    assert metrics.alpha_for_rankings(opposite) < 0


def test_kendall_tau_b_with_ties():
    assert metrics.kendall_tau_b([0, 1, 2], [0, 1, 2]) == 1.0
    assert metrics.kendall_tau_b([0, 1, 2], [2, 1, 0]) == -1.0
    # x = [0, 0, 1], y = [0, 1, 2]: pairs (0,1) tied in x only, (0,2) and (1,2) concordant:
    # tau_b = (2 - 0) / sqrt((2 + 0 + 0) * (2 + 0 + 1)) = 2 / sqrt(6) = 0.8165
    assert metrics.kendall_tau_b([0, 0, 1], [0, 1, 2]) == pytest.approx(2 / 6 ** 0.5)
    assert metrics.kendall_tau_b([0, 0], [0, 1]) is None  # all ties in x


def test_pairwise_agreement_counts_only_strict_pairs():
    # a: 0<1<2; b: 0<1, tie 1=2 -> (0,1) agree, (0,2) agree, (1,2) skipped (b ties): 2/2
    data = {"p": {"a": [0, 1, 2], "b": [0, 1, 1]}, "q": {"a": [0, 1], "b": [1, 0]}}  # q: 1 disagreement
    agreement, n = metrics.pairwise_agreement(data)
    assert (agreement, n) == (pytest.approx(2 / 3), 3)


def test_tau_per_item_is_the_mean_over_pairs_of_annotators():
    """a and b rank 0 < 1 < 2, c the reverse. Pairs: tau(a, b) = 1, tau(a, c) = tau(b, c) = -1:
    the item's mean is (1 - 1 - 1) / 3 = -1/3. Each annotator's figure is their mean against
    the others: a (1 - 1) / 2 = 0, b the same, c (-1 - 1) / 2 = -1. (Against the mean rank of the
    others, a and b met [1, 1, 1], all ties: no tau, and the item read -1 from c alone.)"""
    data = {"p": {"a": [0, 1, 2], "b": [0, 1, 2], "c": [2, 1, 0]}}
    taus = metrics.pair_taus(data)
    assert taus == {"p": {("a", "b"): 1.0, ("a", "c"): -1.0, ("b", "c"): -1.0}}
    assert metrics.per_item_tau(taus)["p"] == pytest.approx(-1 / 3)
    assert metrics.per_annotator_tau(taus) == {"a": (0.0, 1), "b": (0.0, 1), "c": (-1.0, 1)}
    report = metrics.agreement_report({**data, "single": {"a": [0, 1]}})
    assert report["items_with_2plus_annotators"] == 1
    assert report["kendall_tau_pairwise"] == pytest.approx(-1 / 3)


def test_mean_pairwise_tau_is_kendall_and_babington_smiths_u():
    """With complete untied rankings the item's figure is the coefficient of agreement
    u = 2 * sum C(n_ij, 2) / (C(m, 2) * C(k, 2)) - 1 (n_ij: annotators putting i over j).
    Same data: each candidate pair is put one way by a and b and the other way by c, so
    sum C(n_ij, 2) = 3 * (C(2, 2) + C(1, 2)) = 3 and u = 2 * 3 / (3 * 3) - 1 = -1/3. And a
    second item, a = b = [0, 1, 2], c = [1, 0, 2]: pair (0, 1) splits 2-1 (1), (0, 2) and (1, 2)
    are unanimous (C(3, 2) = 3 each): u = 2 * 7 / 9 - 1 = 5/9; pair taus 1, 1/3, 1/3 (c reverses
    one of three pairs): mean 5/9."""
    data = {"p": {"a": [0, 1, 2], "b": [0, 1, 2], "c": [2, 1, 0]}, "q": {"a": [0, 1, 2], "b": [0, 1, 2], "c": [1, 0, 2]}}
    items = metrics.per_item_tau(metrics.pair_taus(data))
    assert items["p"] == pytest.approx(-1 / 3) and items["q"] == pytest.approx(5 / 9)


def test_a_ranking_with_every_candidate_tied_states_no_preference():
    """a ties all three: no tau with it is defined (tau-b's denominator is 0), so only b-c
    counts, tau 1; a has no figure, and `states_no_preference` lets the dashboard say so."""
    data = {"p": {"a": [0, 0, 0], "b": [0, 1, 2], "c": [0, 1, 2]}}
    assert metrics.states_no_preference([0, 0, 0]) and not metrics.states_no_preference([0, 0, 1])
    assert metrics.states_no_preference(metrics.TopRanks([0, 0, 0], 3))
    taus = metrics.pair_taus(data)
    assert taus == {"p": {("b", "c"): 1.0}}
    assert metrics.per_annotator_tau(taus) == {"b": (1.0, 1), "c": (1.0, 1)}


def test_top_m_rankings_are_compared_on_the_pairs_both_order():
    """Top-1 of 3: a puts candidate 0 first, b candidate 1. Both order only 0-1, oppositely:
    tau -1. (A consensus of b's plain ranks [1, 0, 1] made a's 0-2 a tie: -1/sqrt(2).)"""
    data = {"p": {"a": metrics.TopRanks([0, 1, 1], 1), "b": metrics.TopRanks([1, 0, 1], 1)}}
    taus = metrics.pair_taus(data)
    assert metrics.per_item_tau(taus) == {"p": -1.0}
    assert metrics.per_annotator_tau(taus) == {"a": (-1.0, 1), "b": (-1.0, 1)}


def test_annotator_taus_of_one_item():
    assert metrics.annotator_taus({("a", "b"): 1.0, ("a", "c"): -1.0, ("b", "c"): 0.5}) == \
        {"a": 0.0, "b": 0.75, "c": -0.25}


def test_a_top_m_ranking_states_nothing_about_its_unranked():
    """Two annotators rank a top-2 of 4 the same way and leave c and d unordered; a third
    ranks all four with d over c. The unranked pair counts neither as agreement nor as
    disagreement; what the top-2 rankings state does."""
    top = metrics.TopRanks([0, 1, 2, 2], 2)
    full = [0, 1, 3, 2]
    data = {"p": {"a": top, "b": top, "c": full}}
    agreement, n = metrics.pairwise_agreement(data)
    # a-b: 5 stated pairs each (not c-d); a-c and b-c: the same 5. All agree.
    assert (agreement, n) == (1.0, 15)
    # Taken as a tie at rank 2 instead, c-d would be left out too (a tie states no preference),
    # but tau-b would count it against the full ranking; left out, tau is 1 for the top ranks.
    assert metrics.kendall_tau_b(top, full) == pytest.approx(1.0)
    assert metrics.kendall_tau_b([0, 1, 2, 2], full) < 1.0
    disagree = {"p": {"a": metrics.TopRanks([1, 0, 2, 2], 2), "c": full}}
    assert metrics.pairwise_agreement(disagree) == (4 / 5, 5)  # only a-vs-b is reversed
    report = metrics.agreement_report(data)
    assert report["pairwise_agreement"] == 1.0 and report["kendall_tau_pairwise"] is not None
