"""The layout of a PPO run directory, as `align ppo` writes it, and its reader.

    RUN/config.yaml              the resolved PPOConfig
    RUN/metrics.jsonl            one line per iteration (objective/, policy/, val/, timing/ ...)
    RUN/summary.json             final metrics and the held-out evaluation (eval/...)
    RUN/samples.jsonl            held-out prompts with SFT and policy responses, rewards, KL
    RUN/reward.png, RUN/kl.png   reward and KL curves
    RUN/tensorboard/             report_to=tensorboard's events (align.tracking)
    RUN/policy/                  final LoRA adapter + tokenizer (base = absolute SFT path)
    RUN/value_head.safetensors   value head (or critic) weights
    RUN/checkpoints/iter-NNNNNN/ trainable weights, optimiser, scheduler, KL controller,
                                 RNG states of every process, data position (align.checkpoint)

Export and the demo read PPO runs only through this module, so the names live here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.provenance import MODELS_RECORD_FILE
from align.run import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, read_mapping, read_metrics
from align.tracking import TRACKER_OUTPUTS

SAMPLES_FILE = "samples.jsonl"
REWARD_PLOT = "reward.png"
KL_PLOT = "kl.png"
POLICY_DIR = "policy"
VALUE_HEAD_FILE = "value_head.safetensors"
# what a run writes besides its config, metrics and checkpoints: a fresh run into an earlier run's
# directory (overwrite=true) removes them first (align.checkpoint.clear_earlier_run)
OUTPUTS = (SUMMARY_FILE, SAMPLES_FILE, REWARD_PLOT, KL_PLOT, POLICY_DIR, VALUE_HEAD_FILE, MODELS_RECORD_FILE,
           *TRACKER_OUTPUTS)


def is_policy_run(path: str | Path) -> bool:
    """A finished run with a trained policy adapter: PPO, RLOO, GRPO or DPO (dpo.run_dir, of this layout)."""
    return (Path(path) / POLICY_DIR / "adapter_config.json").exists()


@dataclass(frozen=True)
class PolicyRun:
    """A finished policy run's files (PPO, RLOO, GRPO or DPO: the same layout)."""

    path: Path

    @property
    def policy_dir(self) -> Path:
        return self.path / POLICY_DIR

    def config(self) -> dict[str, Any]:
        return read_mapping(self.path / CONFIG_FILE)

    def summary(self) -> dict[str, Any]:
        return read_mapping(self.path / SUMMARY_FILE)

    def adapter_config(self) -> dict[str, Any]:
        return read_mapping(self.policy_dir / "adapter_config.json")

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path / METRICS_FILE)

    def plots(self) -> list[Path]:
        return [self.path / name for name in (REWARD_PLOT, KL_PLOT) if (self.path / name).exists()]
