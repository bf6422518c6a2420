"""PNG plots of a PPO run's reward and KL curves (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ppo.run_dir import KL_PLOT, REWARD_PLOT


def plot_curves(rows: list[dict[str, Any]], run_dir: Path, kl_target: float | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return []
    x = [r["iteration"] for r in rows]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    # the reward model's score, then what the policy is paid: less the missing-eos penalty, less beta * KL
    # too (rows written before objective/reward_model_score was logged leave its line out)
    for key, label in (("objective/reward_model_score", "reward-model score"),
                       ("objective/scores", "score - missing-eos penalty"),
                       ("objective/rlhf_reward", "score - penalty - beta * KL")):
        values = [r.get(key) for r in rows]
        if any(v is not None for v in values):
            ax.plot(x, [float("nan") if v is None else v for v in values], label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward (normalised)")
    ax.set_title("PPO reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / REWARD_PLOT, dpi=100)
    plt.close(fig)
    written.append(run_dir / REWARD_PLOT)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r.get("objective/kl") for r in rows], label="KL(pi || pi_ref) per sequence")
    if kl_target is not None:
        ax.axhline(kl_target, color="grey", linestyle="--", label="KL target")
    ax2 = ax.twinx()
    ax2.plot(x, [r.get("objective/kl_coef") for r in rows], color="tab:red", alpha=0.6, label="beta")
    ax2.set_ylabel("beta")
    ax.set_xlabel("iteration")
    ax.set_ylabel("KL (nats)")
    ax.set_title("PPO KL to the reference")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(run_dir / KL_PLOT, dpi=100)
    plt.close(fig)
    written.append(run_dir / KL_PLOT)
    return written
