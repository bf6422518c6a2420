"""Inter-annotator agreement on rankings (the admin dashboard). Pure functions, no database.

Input everywhere: {item: {annotator: ranks}} where ranks[i] is the rank (0 = best, equal =
tie) of candidate i of that item, or a `TopRanks` for a top-m ranking: its unranked
candidates share rank m, and the order between two of them is not stated (not a tie):
comparisons leave such pairs out. Krippendorff's alpha, which compares rank values, takes
them as tied at rank m. `per_item_tau` and `per_annotator_tau` read the taus `pair_taus`
computes once from such input.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from itertools import combinations
from typing import NamedTuple


class TopRanks(NamedTuple):
    """A top-m ranking: ranks as `align.formats.Ranking` has them (the unranked share rank
    `ranked`, m)."""

    ranks: Sequence[float]
    ranked: int


Ranks = Sequence[float] | TopRanks
RanksByItem = Mapping[Hashable, Mapping[str, Ranks]]


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _ranks(r: Ranks) -> Sequence[float]:
    return r.ranks if isinstance(r, TopRanks) else r


def _stated(r: Ranks, i: int, j: int) -> int | None:
    """How the ranking orders candidates i and j: -1 (i better), 1 (j better), 0 (a tie),
    or None when it does not say (both unranked in a top-m ranking)."""
    if isinstance(r, TopRanks):
        if r.ranks[i] >= r.ranked and r.ranks[j] >= r.ranked:
            return None
        r = r.ranks
    return _sign(r[i] - r[j])


def pairwise_agreement(data: RanksByItem) -> tuple[float | None, int]:
    """Share of (annotator pair, candidate pair) comparisons where both annotators state a
    strict preference and agree on its direction; returns (agreement, n comparisons)."""
    agree = total = 0
    for ranks_by in data.values():
        for a, b in combinations(sorted(ranks_by), 2):
            ra, rb = ranks_by[a], ranks_by[b]
            for i, j in combinations(range(len(_ranks(ra))), 2):
                sa, sb = _stated(ra, i, j), _stated(rb, i, j)
                if sa and sb:
                    total += 1
                    agree += sa == sb
    return (agree / total if total else None), total


def kendall_tau_b(x: Ranks, y: Ranks) -> float | None:
    """Kendall's tau-b (ties in either ranking handled; pairs a top-m ranking leaves
    unordered are left out); None when either is all ties."""
    n = len(_ranks(x))
    conc = disc = tie_x = tie_y = 0
    for i, j in combinations(range(n), 2):
        sx, sy = _stated(x, i, j), _stated(y, i, j)
        if sx is None or sy is None:
            continue
        if sx == 0 and sy == 0:
            continue
        if sx == 0:
            tie_x += 1
        elif sy == 0:
            tie_y += 1
        elif sx == sy:
            conc += 1
        else:
            disc += 1
    denom = math.sqrt((conc + disc + tie_x) * (conc + disc + tie_y))
    return (conc - disc) / denom if denom else None


def states_no_preference(r: Ranks) -> bool:
    """True for a ranking that puts every candidate in one tie: it orders no pair, so no
    Kendall tau with it is defined (0/0) and it counts in no agreement figure but alpha's."""
    return len(set(_ranks(r))) <= 1


# Agreement on one prompt is measured between its annotators two at a time: the mean, over
# the pairs of annotators, of Kendall's tau-b between their two rankings. With complete
# untied rankings this mean is the coefficient of agreement of M. G. Kendall and B. Babington
# Smith ("On the method of paired comparisons", Biometrika 31, 1940), for m annotators and k
# candidates u = 2 * sum over i != j of C(n_ij, 2) / (C(m, 2) * C(k, 2)) - 1, where n_ij of the
# annotators put candidate i over j: both count, over the candidate pairs, the pairs of
# annotators who agree minus those who do not (tests/annotation/test_metrics.py works one out).
# Tau-b carries it over to ties, and to top-m rankings by leaving out each candidate pair
# either ranking does not order. It needs no consensus, which tau against the mean rank of the
# other annotators would: where the others split, two opposite rankings average to a tie of every
# candidate, that tau is undefined and whoever agreed with one of them gets no credit; and a mean
# of ranks turns a top-m ranking's unordered pairs into ties.
PairTaus = Mapping[Hashable, Mapping[tuple[str, str], float]]


def pair_taus(data: RanksByItem) -> dict[Hashable, dict[tuple[str, str], float]]:
    """{item: {(a, b): tau-b between the rankings of annotators a < b}} for every item with two
    or more annotators; a pair whose tau is undefined (a ranking all ties, or no candidate pair
    that both order) is left out, and so is an item with none defined."""
    out = {}
    for item, ranks_by in data.items():
        taus = {}
        for a, b in combinations(sorted(ranks_by), 2):
            tau = kendall_tau_b(ranks_by[a], ranks_by[b])
            if tau is not None:
                taus[(a, b)] = tau
        if taus:
            out[item] = taus
    return out


def per_item_tau(taus: PairTaus) -> dict[Hashable, float]:
    """{item: mean tau-b over its pairs of annotators} (`pair_taus`' items): below 0, a pair
    of its annotators orders more candidate pairs oppositely than alike, on average."""
    return {item: sum(by_pair.values()) / len(by_pair) for item, by_pair in taus.items()}


def annotator_taus(by_pair: Mapping[tuple[str, str], float]) -> dict[str, float]:
    """One item's pairs' taus as {annotator: mean tau-b against each other annotator}."""
    sums: dict[str, list[float]] = {}
    for (a, b), tau in by_pair.items():
        sums.setdefault(a, []).append(tau)
        sums.setdefault(b, []).append(tau)
    return {name: sum(v) / len(v) for name, v in sums.items()}


def per_annotator_tau(taus: PairTaus) -> dict[str, tuple[float, int]]:
    """{annotator: (mean over their items of their mean tau-b against each other annotator of
    the item, items)}; the items are those where it is defined for them. Who ranks against
    the others stands out; agreeing with one annotator and opposing another scores 0."""
    sums: dict[str, list[float]] = {}
    for by_pair in taus.values():
        for name, tau in annotator_taus(by_pair).items():
            sums.setdefault(name, []).append(tau)
    return {name: (sum(v) / len(v), len(v)) for name, v in sums.items()}


def krippendorff_alpha_ordinal(units: Sequence[Sequence[float | None]]) -> float | None:
    """Krippendorff's alpha with the ordinal difference function (Krippendorff 2011,
    "Computing Krippendorff's Alpha-Reliability"). `units` holds, per unit, the value each
    coder gave (None = missing). Units with fewer than two values are not pairable."""
    coincidence: Counter[tuple[float, float]] = Counter()
    for unit in units:
        vals = [v for v in unit if v is not None]
        m = len(vals)
        if m < 2:
            continue
        for i, j in ((i, j) for i in range(m) for j in range(m) if i != j):
            coincidence[(vals[i], vals[j])] += 1.0 / (m - 1)
    if not coincidence:
        return None
    values = sorted({c for c, _ in coincidence})
    n_c = {v: sum(w for (c, _), w in coincidence.items() if c == v) for v in values}
    n = sum(n_c.values())
    idx = {v: i for i, v in enumerate(values)}

    def delta2(c: float, k: float) -> float:  # ordinal metric: marginal mass between c and k
        lo, hi = sorted((idx[c], idx[k]))
        s = sum(n_c[values[g]] for g in range(lo, hi + 1)) - (n_c[c] + n_c[k]) / 2.0
        return s * s

    observed = sum(w * delta2(c, k) for (c, k), w in coincidence.items())
    expected = sum(n_c[c] * n_c[k] * delta2(c, k) for c in values for k in values) / (n - 1)
    if expected == 0:
        return None  # every value identical: alpha is undefined
    return 1.0 - observed / expected


def alpha_for_rankings(data: RanksByItem) -> float | None:
    """Ordinal alpha with one unit per (item, candidate) and the annotators as coders."""
    coders = sorted({a for ranks_by in data.values() for a in ranks_by})
    units = []
    for ranks_by in data.values():
        k = len(_ranks(next(iter(ranks_by.values())))) if ranks_by else 0
        for i in range(k):
            units.append([_ranks(ranks_by[c])[i] if c in ranks_by else None for c in coders])
    return krippendorff_alpha_ordinal(units)


def agreement_report(data: RanksByItem, taus: PairTaus | None = None) -> dict[str, float | int | None]:
    """The project's agreement figures; `taus`: `pair_taus(data)` where the caller has them."""
    multi = {item: r for item, r in data.items() if len(r) >= 2}
    agreement, n_pairs = pairwise_agreement(multi)
    items = per_item_tau(pair_taus(multi) if taus is None else taus)
    mean_tau = (sum(items.values()) / len(items)) if items else None
    return {
        "items_with_2plus_annotators": len(multi),
        "pairwise_agreement": agreement,
        "pairwise_comparisons": n_pairs,
        "kendall_tau_pairwise": mean_tau,  # mean over items of the mean tau-b over annotator pairs
        "krippendorff_alpha_ordinal": alpha_for_rankings(multi),
    }
