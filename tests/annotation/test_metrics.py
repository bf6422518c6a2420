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


def test_tau_vs_leave_one_out_consensus():
    data = {"p": {"a": [0, 1, 2], "b": [0, 1, 2], "c": [2, 1, 0]}}
    # a vs mean(b, c) = [1, 1, 1] -> undefined (all ties); c vs mean(a,b) = [0,1,2] -> -1; b like a
    # a vs mean(b,c) = [1,1,1] is all ties -> skipped; b likewise; c -> -1
    assert metrics.per_item_tau(data)["p"] == -1.0
    report = metrics.agreement_report({**data, "single": {"a": [0, 1]}})
    assert report["items_with_2plus_annotators"] == 1


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
    assert report["pairwise_agreement"] == 1.0 and report["kendall_tau_vs_consensus"] is not None
