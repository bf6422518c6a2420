"""The layout of a reward run directory, as `align reward train` writes it, and its reader.

    RUN/config.yaml        the resolved RewardConfig
    RUN/metrics.jsonl      one line per logged training step
    RUN/summary.json       final metrics (eval/accuracy, eval/num_pairs, train/rankings, timing/...)
    RUN/model/             the reward model: checkpoint or PEFT adapter, tokenizer,
                           reward_normalization.json and reward_model_info.json
    RUN/tensorboard/       report_to=tensorboard's events (align.tracking)
    RUN/checkpoints/step-NNNNNN/  what is trained, optimiser, scheduler, RNGs and step (align.checkpoint),
                           every `train.save_every` steps; `align reward train --resume RUN` continues

Export, the demo and PPO read reward runs only through this module, so the names live here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import UserError
from align.run import CONFIG_FILE, SUMMARY_FILE, read_mapping
from align.tracking import TRACKER_OUTPUTS

MODEL_DIR = "model"
NORMALIZATION_FILE = "reward_normalization.json"  # {"gain", "bias"}: reward = gain * raw + bias
INFO_FILE = "reward_model_info.json"  # provenance: config, data source, base model, summary
IMPORTED_FROM = "imported_from"  # the key of INFO_FILE that marks a model trained elsewhere (`align reward import`)
# what a run writes besides its config, metrics and checkpoints: a fresh run into an earlier run's
# directory (overwrite=true) removes them first (align.checkpoint.clear_earlier_run)
OUTPUTS = (SUMMARY_FILE, MODEL_DIR, *TRACKER_OUTPUTS)


def model_dir(path: str | Path) -> Path:
    """RUN or RUN/model (or an exported reward model) -> the directory that holds the model."""
    path = Path(path)
    if (path / MODEL_DIR / NORMALIZATION_FILE).exists():
        return path / MODEL_DIR
    if (path / NORMALIZATION_FILE).exists():
        return path
    if not path.exists():
        raise UserError(f"reward model not found: {path}")
    hint = (f"; a reward model trained elsewhere is read once imported: align reward import {path} --policy SFT "
            "--data RANKINGS --out DIR" if (path / "config.json").is_file() else "")
    raise UserError(f"{path} is not a reward model (no {NORMALIZATION_FILE} in it or in {path / MODEL_DIR}){hint}")


def is_reward_model(path: str | Path) -> bool:
    path = Path(path)
    return (path / MODEL_DIR / NORMALIZATION_FILE).exists() or (path / NORMALIZATION_FILE).exists()


@dataclass(frozen=True)
class RewardRun:
    """A reward run directory (RUN) or a reward model directory on its own (RUN/model, an export)."""

    path: Path

    @classmethod
    def open(cls, path: str | Path) -> RewardRun:
        model = model_dir(path)
        return cls(model.parent if model.name == MODEL_DIR and (model.parent / SUMMARY_FILE).exists() else model)

    @property
    def model_dir(self) -> Path:
        return model_dir(self.path)

    def info(self) -> dict[str, Any]:
        """Provenance saved with the model: {"config", "data", "base_model", "summary"}."""
        return read_mapping(self.model_dir / INFO_FILE)

    def summary(self) -> dict[str, Any]:
        """The run's summary.json, or the copy saved with the model when only the model is at hand."""
        return read_mapping(self.path / SUMMARY_FILE) or self.info().get("summary", {})

    def config(self) -> dict[str, Any]:
        """The resolved config as a mapping (from config.yaml, or the copy saved with the model)."""
        return read_mapping(self.path / CONFIG_FILE) or self.info().get("config", {})

    def base_model(self) -> str | None:
        return self.info().get("base_model") or self.config().get("model", {}).get("name_or_path")
