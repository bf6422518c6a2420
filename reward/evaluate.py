"""Held-out evaluation of a reward model on rankings.

Keys (all under the given prefix, `eval/` by default):
    accuracy, num_pairs, num_rankings   pairwise accuracy over every ordered pair the held-out rankings
                                        imply (an exact reward tie counts one half)
    accuracy_k{K}, num_pairs_k{K}       the same for rankings of K responses
    reward_margin                       mean r_w - r_l over those pairs (normalised reward units)
    loss                                InstructGPT K-wise loss on the held-out rankings, of the raw rewards
                                        (the scale the model trained at) and at margin 0: comparable with
                                        train/ranking_loss where train.margin is 0, the default (train/loss
                                        adds the centering and mismatched-prompt terms)
    cross_annotator_accuracy            where several annotators judged the same response pair: the model
                                        against each of those judgments ...
    annotator_agreement                 ... and the annotators against each other on the same pairs: the
                                        ceiling a reward model can reach on these labels (InstructGPT's
                                        training labelers agree with each other 72.6% of the time)
    cross_annotator_num_pairs           response pairs judged by several annotators
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from align.formats import Ranking, ordered_pairs
from reward.losses import kwise_ranking_loss, pair_accuracy
from reward.run_dir import ALIGN


def text_key(prompt: Any, response: str) -> tuple[str, str]:
    """The key of a (prompt, response) in `reward_table` (a conversation prompt as sorted JSON)."""
    return (prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True), response)


@torch.no_grad()
def reward_table(model, tokenizer, rankings: Sequence[Ranking], *, max_length: int, batch_size: int,
                 rendering: str = ALIGN) -> dict[tuple[str, str], float]:
    """Raw reward (before any normalisation) of every distinct (prompt, response) in the rankings,
    each forwarded once (read as `rendering` says: `reward.model.render_texts`)."""
    from reward.model import render_texts, score_texts

    unique: dict[tuple[str, str], tuple[Any, str]] = {}
    for r in rankings:
        for resp in r.responses:
            unique.setdefault(text_key(r.prompt, resp), (r.prompt, resp))
    keys = list(unique)
    texts = render_texts(tokenizer, [unique[k][0] for k in keys], [unique[k][1] for k in keys], rendering)
    raw = score_texts(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)
    return dict(zip(keys, raw.tolist()))


def ranking_metrics(rankings: Sequence[Ranking], rewards: dict[tuple[str, str], float], prefix: str = "eval/",
                    margin_scale: float = 1.0) -> dict[str, Any]:
    """Accuracy, by K, margin, loss and the cross-annotator figures, from precomputed rewards.
    `margin_scale`: the normalisation's gain, applied to the reported margin only (accuracy does not
    depend on it, the loss is the rewards' own)."""
    correct: list[float] = []
    margins: list[float] = []
    by_k: dict[int, list[float]] = defaultdict(list)
    flat, winners, losers, groups = [], [], [], []
    for g, r in enumerate(rankings):
        rs = [rewards[text_key(r.prompt, resp)] for resp in r.responses]
        offset = len(flat)
        flat.extend(rs)
        for w, l in ordered_pairs(r.ranks):
            acc = pair_accuracy(torch.tensor(rs[w]), torch.tensor(rs[l])).item()
            correct.append(acc)
            by_k[len(r.responses)].append(acc)
            margins.append(rs[w] - rs[l])
            winners.append(offset + w)
            losers.append(offset + l)
            groups.append(g)
    out: dict[str, Any] = {
        f"{prefix}accuracy": sum(correct) / max(1, len(correct)),
        f"{prefix}num_pairs": len(correct),
        f"{prefix}num_rankings": len(rankings),
        f"{prefix}reward_margin": margin_scale * sum(margins) / max(1, len(margins)),
    }
    if correct:
        out[f"{prefix}loss"] = kwise_ranking_loss(
            torch.tensor(flat), torch.tensor(winners), torch.tensor(losers), torch.tensor(groups), len(rankings)
        ).item()
    for k in sorted(by_k):
        out[f"{prefix}accuracy_k{k}"] = sum(by_k[k]) / len(by_k[k])
        out[f"{prefix}num_pairs_k{k}"] = len(by_k[k])
    out.update(cross_annotator_metrics(rankings, rewards, prefix))
    return out


def cross_annotator_metrics(rankings: Sequence[Ranking], rewards: dict[tuple[str, str], float], prefix: str) -> dict[str, Any]:
    """Model-vs-annotator and annotator-vs-annotator agreement on pairs several annotators judged."""
    # (prompt, response a, response b) with a < b -> {annotator: +1 if a preferred, -1 if b preferred}
    judged: dict[tuple[str, str, str], dict[str, int]] = defaultdict(dict)
    for r in rankings:
        if r.annotator is None:
            continue
        for i, j in itertools.combinations(range(len(r.responses)), 2):
            if r.ranks[i] == r.ranks[j]:
                continue
            ki, kj = text_key(r.prompt, r.responses[i]), text_key(r.prompt, r.responses[j])
            a, b, sign = (ki, kj, 1) if ki[1] < kj[1] else (kj, ki, -1)
            judged[(a[0], a[1], b[1])][r.annotator] = sign if r.ranks[i] < r.ranks[j] else -sign
    model_hits, annot_hits = [], []
    for (prompt, a, b), votes in judged.items():
        if len(votes) < 2:
            continue
        ra, rb = rewards[(prompt, a)], rewards[(prompt, b)]
        model_sign = (ra > rb) - (ra < rb)
        for v in votes.values():
            model_hits.append(1.0 if model_sign == v else (0.5 if model_sign == 0 else 0.0))
        for u, v in itertools.combinations(votes.values(), 2):
            annot_hits.append(1.0 if u == v else 0.0)
    if not annot_hits:
        return {}
    return {
        f"{prefix}cross_annotator_accuracy": sum(model_hits) / len(model_hits),
        f"{prefix}annotator_agreement": sum(annot_hits) / len(annot_hits),
        f"{prefix}cross_annotator_num_pairs": sum(1 for v in judged.values() if len(v) >= 2),
    }


def pair_outcomes(rankings: Sequence[Ranking], rewards: dict[tuple[str, str], float]) -> list[list[float]]:
    """For each ranking, 1 / 0 / 0.5 (a tie) per ordered pair it implies: whether the reward put the
    preferred response above the other."""
    out = []
    for r in rankings:
        rs = [rewards[text_key(r.prompt, resp)] for resp in r.responses]
        out.append([1.0 if rs[w] > rs[l] else 0.5 if rs[w] == rs[l] else 0.0 for w, l in ordered_pairs(r.ranks)])
    return out


def outcomes_by_prompt(rankings: Sequence[Ranking], outcomes: Sequence[Sequence[float]]) -> list[list[float]]:
    """The pair outcomes of `rankings` (`pair_outcomes`) pooled per prompt as the held-out split draws
    it (`reward.data.prompt_key`: an OpenAssistant tree's ranked groups, several annotators' rankings of
    one prompt, HH dialogues opening the same way), in first-seen order: the units to resample."""
    from reward.data import prompt_key

    pooled: dict[str, list[float]] = {}
    for ranking, group in zip(rankings, outcomes, strict=True):
        pooled.setdefault(prompt_key(ranking), []).extend(group)
    return list(pooled.values())


def bootstrap_interval(groups: Sequence[Sequence[float]], level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the pairwise accuracy (all pairs pooled), resampling whole groups.
    The C(K,2) pairs of one ranking share its responses, and the rankings of one prompt share the
    prompt (and, in an OpenAssistant tree, the conversation), so neither are independent draws:
    pass one group per held-out prompt (`outcomes_by_prompt`), the unit the split samples.
    Resampling pairs would understate the width (for independent K = 2 rankings it is the
    ordinary bootstrap)."""
    import random

    rng = random.Random(seed)
    sums = [(sum(g), len(g)) for g in groups if g]
    stats = []
    for _ in range(resamples):
        draw = [sums[rng.randrange(len(sums))] for _ in sums]
        stats.append(sum(c for c, _ in draw) / sum(n for _, n in draw))
    stats.sort()
    tail = (1 - level) / 2
    return stats[int(tail * resamples)], stats[min(resamples - 1, int((1 - tail) * resamples))]


def length_rewards(rankings: Sequence[Ranking]) -> dict[tuple[str, str], float]:
    """The 'longer response wins' baseline as a reward table: a response's length in characters."""
    return {text_key(r.prompt, resp): float(len(resp)) for r in rankings for resp in r.responses}


def evaluate_rankings(model, tokenizer, rankings: Sequence[Ranking], *, max_length: int, batch_size: int,
                      gain: float = 1.0, prefix: str = "eval/", rendering: str = ALIGN) -> dict[str, Any]:
    """Held-out metrics of a reward model: the loss of its raw rewards, the margin in normalised units
    (`gain`: the normalisation's scale; its shift moves no margin)."""
    rewards = reward_table(model, tokenizer, rankings, max_length=max_length, batch_size=batch_size,
                           rendering=rendering)
    return ranking_metrics(rankings, rewards, prefix, margin_scale=gain)


def format_table(summary: dict[str, Any]) -> str:
    """Two aligned columns, one metric a line, for the terminal."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in summary.items()
            if isinstance(v, (int, float, str)) and "/" in k]
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
