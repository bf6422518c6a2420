"""The demo's before/after table and `OUT/report.md`.

One baseline for the scores: the table's reward-model and gold rows, the text and the gold-score plot
all come from the same comparison of the SFT and the exported model on the same held-out prompts,
sampled alike. The KL row is the policy stage's own held-out evaluation (its prompts and samples:
measuring a KL needs both models' log-probabilities of the samples), and says so. The reward and KL curves are the PPO stage's own plots, linked, not redrawn, where this run's
method ran that stage: after `--continue method=dpo` OUT/ppo still holds an earlier run's plots,
which describe another policy. The report describes only the run that wrote it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

PPO_STAGE_METHODS = ("ppo", "rloo", "grpo")  # the demo's methods that run the PPO stage (OUT/ppo)


def print_table(summary: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    def f(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:+.3f}"

    rows = [("reward-model score (normalised)", f("demo/reward_sft"), f("demo/reward_export"))] * has_reward_model(summary)
    rows += [("gold judge score", f("demo/gold_sft"), f("demo/gold_export")),
             ("KL to the reference (per sequence)*", "+0.000", f("eval/kl"))]
    print("\n" + f"{'held-out prompts':<36} {'SFT':>10} {'aligned':>10}")
    for name, a, b in rows:
        print(f"{name:<36} {a:>10} {b:>10}")
    print(f"(method {summary.get('demo/method', 'ppo')}; temperature {summary.get('demo/temperature')}; gold std of SFT "
          f"samples: {summary.get('demo/gold_sft_std', 0):.3f}; {accuracy_note(summary)})\n* {kl_note(summary)}")
    for row in samples[:3]:
        print(f"\nprompt : {row['prompt']}\nSFT    : {row['sft']}  [gold {row['gold_sft']:+.2f}]\n"
              f"aligned: {row['aligned']}  [gold {row['gold_aligned']:+.2f}]")


def has_reward_model(summary: dict[str, Any]) -> bool:
    return "demo/reward_sft" in summary


def kl_note(summary: dict[str, Any]) -> str:
    """Where the table's KL comes from: not the comparison its scores come from."""
    return (f"KL from the policy stage's own held-out evaluation ({summary.get('eval/num_prompts')} samples), "
            f"not from the {summary.get('demo/num_eval_prompts')} compared above")


def accuracy_note(summary: dict[str, Any]) -> str:
    """The held-out pairwise accuracy of what learned the rankings: the reward model, or DPO's implicit reward."""
    if has_reward_model(summary):
        labels = {"annotators": " against the simulated annotators' labels", "gold": " against the gold judge"}
        return (f"reward-model held-out pairwise accuracy{labels.get(summary.get('reward/eval_label_source'), '')}: "
                f"{summary.get('reward/eval_accuracy') or 0:.3f} on {summary.get('reward/eval_num_pairs')} pairs")
    return (f"held-out pairwise accuracy of DPO's implicit reward: {summary.get('eval/accuracy') or 0:.3f} "
            f"on {summary.get('eval/num_pairs')} pairs")


# --------------------------------------------------------------------------- report


def write_report(out: Path, cfg: Any, summary: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    plots = (ppo_plots(out) if cfg.method in PPO_STAGE_METHODS else []) + gold_plot(out, samples)
    reward_row = [f"| reward-model score | {summary.get('demo/reward_sft', 0):.3f} | "
                  f"{summary.get('demo/reward_export', 0):.3f} |"] * has_reward_model(summary)
    lines = ["# align demo report", "", f"Run directory: `{out}` (method {summary.get('demo/method', 'ppo')})", "",
             "| held-out prompts | SFT | aligned |", "|---|---|---|", *reward_row,
             f"| gold judge score | {summary.get('demo/gold_sft', 0):.3f} | {summary.get('demo/gold_export', 0):.3f} |",
             f"| KL to the reference* | 0 | {summary.get('eval/kl', 0):.3f} |", "",
             f"\\* {kl_note(summary)}.", "",
             f"Both models sampled at temperature {summary.get('demo/temperature')}, as in the policy run's evaluation. "
             f"Gold score std of the SFT samples: {summary.get('demo/gold_sft_std', 0):.3f}. "
             f"{accuracy_note(summary).capitalize()}.", ""]
    for title, name in plots:
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    lines += ["## Samples", "", "| prompt | SFT | aligned |", "|---|---|---|"]
    for row in samples[:8]:
        cells = [row["prompt"], f"{row['sft']} (gold {row['gold_sft']:+.2f})",
                 f"{row['aligned']} (gold {row['gold_aligned']:+.2f})"]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    lines += ["", "Settings: " + ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
                                          if not f.name.endswith("_config")), ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")


def ppo_plots(out: Path) -> list[tuple[str, str]]:
    """The PPO run's reward and KL curves, as that run drew them (paths relative to the report)."""
    from ppo.run_dir import PolicyRun

    titles = {"reward.png": "Reward during PPO", "kl.png": "KL to the reference during PPO"}
    return [(titles.get(p.name, p.stem), os.path.relpath(p, out)) for p in PolicyRun(out / "ppo").plots()]


def gold_plot(out: Path, samples: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Gold scores of the held-out responses, SFT against aligned: the table's numbers, per prompt."""
    if not samples:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft = [row["gold_sft"] for row in samples]
    aligned = [row["gold_aligned"] for row in samples]
    fig, ax = plt.subplots(figsize=(6, 4))
    low, high = min(sft + aligned), max(sft + aligned)
    bins = [low + (high - low) * i / 20 for i in range(21)] if high > low else 1  # the same bins for both
    ax.hist(sft, bins=bins, alpha=0.55, label=f"SFT (mean {sum(sft) / len(sft):+.2f})")
    ax.hist(aligned, bins=bins, alpha=0.55, label=f"aligned (mean {sum(aligned) / len(aligned):+.2f})")
    ax.set(title="Gold score of held-out responses", xlabel="gold score", ylabel="responses")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gold_scores.png", dpi=110)
    plt.close(fig)
    return [("Gold score of held-out responses, SFT and aligned", "gold_scores.png")]
