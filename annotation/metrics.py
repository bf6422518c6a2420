"""Inter-annotator agreement on rankings (the admin dashboard). Pure functions, no database.

Input everywhere: {item: {annotator: ranks}} where ranks[i] is the rank (0 = best, equal =
tie) of candidate i of that item, or a `TopRanks` for a top-m ranking: its unranked
candidates share rank m, and the order between two of them is not stated (not a tie):
comparisons leave such pairs out. Krippendorff's alpha, which compares rank values, takes
them as tied at rank m.
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


def _consensus(ranks_by: Mapping[str, Ranks], name: str) -> list[float]:
    """The mean rank each candidate got from the item's annotators other than `name`."""
    others = [_ranks(r) for o, r in ranks_by.items() if o != name]
    return [sum(r[i] for r in others) / len(others) for i in range(len(_ranks(ranks_by[name])))]


def per_item_tau(data: RanksByItem) -> dict[Hashable, float]:
    """Mean over annotators of tau-b between their ranks and the leave-one-out consensus
    (mean rank given by the item's other annotators), for items with >= 2 annotators."""
    out = {}
    for item, ranks_by in data.items():
        names = sorted(ranks_by)
        if len(names) < 2:
            continue
        taus = []
        for name in names:
            consensus = _consensus(ranks_by, name)
            tau = kendall_tau_b(ranks_by[name], consensus)
            if tau is not None:
                taus.append(tau)
        if taus:
            out[item] = sum(taus) / len(taus)
    return out


def per_annotator_tau(data: RanksByItem) -> dict[str, tuple[float, int]]:
    """{annotator: (mean tau-b against the leave-one-out consensus, items)} over the items
    that annotator shares with at least one other; who ranks against the crowd stands out."""
    sums: dict[str, list[float]] = {}
    for ranks_by in data.values():
        names = sorted(ranks_by)
        if len(names) < 2:
            continue
        for name in names:
            consensus = _consensus(ranks_by, name)
            tau = kendall_tau_b(ranks_by[name], consensus)
            if tau is not None:
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


def agreement_report(data: RanksByItem) -> dict[str, float | int | None]:
    multi = {item: r for item, r in data.items() if len(r) >= 2}
    agreement, n_pairs = pairwise_agreement(multi)
    taus = per_item_tau(multi)
    return {
        "items_with_2plus_annotators": len(multi),
        "pairwise_agreement": agreement,
        "pairwise_comparisons": n_pairs,
        "kendall_tau_vs_consensus": (sum(taus.values()) / len(taus)) if taus else None,
        "krippendorff_alpha_ordinal": alpha_for_rankings(multi),
    }
