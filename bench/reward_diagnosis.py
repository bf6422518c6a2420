"""Where a reward model stands on the synthetic task, and how far it could go.

Prints held-out pairwise accuracy against the gold judge for:

- one simulated annotator (the labels the reward model learns from);
- the learnable ceiling: a linear model on the gold judge's own features
  (`align.synthetic.gold_features`) fitted with the same K-wise loss to the same noisy
  training rankings; what a reward model with perfect features would reach;
- a trained reward model (`--model RUN`), overall, by the size of the gold difference of a
  pair, and by which attributes the two responses differ in, so one can see whether errors
  are the noise-limited near-ties or an attribute the model has not learned.

    python bench/reward_diagnosis.py --model runs/demo/reward
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

Scorer = Callable[[str, str], float]
GAP_BUCKETS = (0.5, 1.0, 2.0, float("inf"))  # upper edges of |gold(a) - gold(b)|


def gold_pairs(rankings) -> list[tuple[str, str, str, float]]:
    """(prompt, better, worse, gold difference) for every untied pair of the held-out rankings."""
    from align.synthetic import gold_score

    out = []
    for r in rankings:
        gold = [gold_score(r.prompt, s) for s in r.responses]
        for i, j in itertools.combinations(range(len(gold)), 2):
            if gold[i] != gold[j]:
                (a, b) = (i, j) if gold[i] > gold[j] else (j, i)
                out.append((r.prompt, r.responses[a], r.responses[b], abs(gold[i] - gold[j])))
    return out


def annotator_accuracy(annotator_rankings, gold_rankings) -> float:
    """Fraction of untied gold pairs a single simulated annotator orders like the gold judge."""
    agree = total = 0
    for ann, gold in zip(annotator_rankings, gold_rankings):
        for i, j in itertools.combinations(range(len(gold.ranks)), 2):
            if gold.ranks[i] != gold.ranks[j]:
                total += 1
                agree += (ann.ranks[i] - ann.ranks[j]) * (gold.ranks[i] - gold.ranks[j]) > 0
    return agree / total


def fit_linear_oracle(train_rankings) -> tuple[Scorer, dict[str, float]]:
    """K-wise loss (InstructGPT) on the gold features of the training rankings' responses."""
    import torch

    from align.formats import ordered_pairs
    from align.synthetic import GOLD_WEIGHTS, gold_features
    from reward.losses import kwise_ranking_loss

    names = list(GOLD_WEIGHTS)
    rows, winners, losers, groups = [], [], [], []
    for g, r in enumerate(train_rankings):
        base = len(rows)
        rows += [[gold_features(r.prompt, s)[n] for n in names] for s in r.responses]
        for w, l in ordered_pairs(r.ranks):
            winners.append(base + w)
            losers.append(base + l)
            groups.append(g)
    x = torch.tensor(rows)
    scale = x.abs().amax(0).clamp(min=1.0)  # excess_words counts up to 50: keep LBFGS well conditioned
    w_idx, l_idx, g_idx = torch.tensor(winners), torch.tensor(losers), torch.tensor(groups)
    theta = torch.zeros(len(names), requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = kwise_ranking_loss((x / scale) @ theta, w_idx, l_idx, g_idx, len(train_rankings))
        loss.backward()
        return loss

    opt.step(closure)
    weights = dict(zip(names, (theta.detach() / scale).tolist()))
    return (lambda p, s: sum(weights[n] * v for n, v in gold_features(p, s).items())), weights


def accuracy_by(pairs: Sequence[tuple[str, str, str, float]], score: Scorer, key: Callable[..., str]) -> dict[str, tuple[float, int]]:
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for prompt, better, worse, gap in pairs:
        k = key(prompt, better, worse, gap)
        hits[k][0] += score(prompt, better) > score(prompt, worse)
        hits[k][1] += 1
    return {k: (c / n, n) for k, (c, n) in hits.items()}


def gap_bucket(prompt: str, better: str, worse: str, gap: float) -> str:
    edge = next(e for e in GAP_BUCKETS if gap < e)
    return f"gold gap < {edge:g}" if edge != float("inf") else f"gold gap >= {GAP_BUCKETS[-2]:g}"


def differing_attributes(prompt: str, better: str, worse: str, gap: float) -> str:
    from align.synthetic import gold_features

    fa, fb = gold_features(prompt, better), gold_features(prompt, worse)
    differ = [n for n in fa if n != "excess_words" and fa[n] != fb[n]]
    return " + ".join(differ) or "length only"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="reward model run directory (RUN or RUN/model) to diagnose")
    parser.add_argument("--rankings", type=int, default=2000, help="training rankings (as data.num_rankings)")
    parser.add_argument("--eval-rankings", type=int, default=300, help="held-out rankings (as data.num_eval_rankings)")
    parser.add_argument("--agreement", type=float, default=0.73)
    parser.add_argument("--seed", type=int, default=0, help="data.seed of the synthetic rankings")
    parser.add_argument("--top", type=int, default=15, help="attribute combinations to list")
    args = parser.parse_args(argv)

    from reward.config import DataSection
    from reward.data import load_reward_data

    data = load_reward_data(DataSection(num_rankings=args.rankings, num_eval_rankings=args.eval_rankings,
                                        agreement=args.agreement, seed=args.seed))
    pairs = gold_pairs(data.eval)
    oracle, weights = fit_linear_oracle(data.train)
    overall = lambda score: accuracy_by(pairs, score, lambda *a: "all")["all"][0]  # noqa: E731

    print(f"held-out pairs against the gold judge: {len(pairs)} (from {len(data.eval)} rankings)\n")
    print(f"{'scorer':48s} {'accuracy':>8s}")
    print(f"{'one simulated annotator (the training labels)':48s} {annotator_accuracy(data.eval_annotator, data.eval):8.4f}")
    print(f"{'linear model on the gold features (ceiling)':48s} {overall(oracle):8.4f}")
    print("   fitted weights, up to scale: " + ", ".join(f"{k} {v:+.3f}" for k, v in weights.items()))
    if not args.model:
        return

    from reward.evaluate import reward_table, text_key
    from reward.model import load_reward_model

    rm = load_reward_model(args.model)
    table = reward_table(rm.model, rm.tokenizer, data.eval, max_length=rm.max_length, batch_size=64)
    model = lambda p, s: table[text_key(p, s)]  # noqa: E731
    print(f"{'reward model ' + args.model:48s} {overall(model):8.4f}\n")

    print(f"{'pairs':30s} {'n':>5s} {'model':>6s} {'ceiling':>8s}")
    by_gap_model, by_gap_oracle = accuracy_by(pairs, model, gap_bucket), accuracy_by(pairs, oracle, gap_bucket)
    for k in sorted(by_gap_model, key=lambda k: (">=" in k, k)):
        print(f"{k:30s} {by_gap_model[k][1]:5d} {by_gap_model[k][0]:6.2f} {by_gap_oracle[k][0]:8.2f}")
    print(f"\n{'responses differ in':84s} {'n':>5s} {'model':>6s} {'errors':>6s}")
    by_attr = accuracy_by(pairs, model, differing_attributes)
    for k, (acc, n) in sorted(by_attr.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{k:84s} {n:5d} {acc:6.2f} {round(n * (1 - acc)):6d}")


if __name__ == "__main__":
    main()
