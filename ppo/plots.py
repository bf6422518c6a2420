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
    for key, label in (("objective/scores", "reward-model score"), ("objective/rlhf_reward", "score - beta * KL")):
        ax.plot(x, [r.get(key) for r in rows], label=label)
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
