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
# how a reward model reads a (prompt, response), as INFO_FILE's "rendering" records it (reward.model.render_texts)
ALIGN = "align"  # the prompt with its generation prompt, the response, eos: align's own reward models
CONVERSATION = "conversation"  # the whole conversation through the chat template: one trained elsewhere
TEXT_PAIR = "text_pair"  # the prompt and the response as a text pair, tokenizer(question, answer): an encoder trained so
IMPORT_RENDERINGS = (CONVERSATION, TEXT_PAIR)  # the readings `align reward import --rendering` offers
IMPORTED_FROM = "imported_from"  # the key of INFO_FILE that marks a model trained elsewhere (`align reward import`)
# what a run writes besides its config, metrics and checkpoints: a fresh run into an earlier run's
# directory (overwrite=true) removes them first (align.checkpoint.clear_earlier_run)
OUTPUTS = (SUMMARY_FILE, MODEL_DIR, *TRACKER_OUTPUTS)


def recorded_max_length(info: dict) -> int:
    """The tokens a reward model reads, as INFO_FILE records them (512 where it does not)."""
    return int(info.get("config", {}).get("model", {}).get("max_length", 512))


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

    def normalization_policy(self) -> str | None:
        """The policy whose samples its rewards were normalised on (mean 0, std 1) as recorded: the
        SFT checkpoint named at import or in eval.normalize_policy, else its own base; None where
        they were not normalised."""
        evaluation = self.config().get("eval", {})
        if evaluation.get("normalize") is False:
            return None
        return evaluation.get("normalize_policy") or self.base_model()


def normalised_elsewhere(reward_model: str | Path, policy: Path) -> str | None:
    """One line where the reward model's normalisation was fitted on another policy's samples than
    `policy`'s (the SFT checkpoint a run starts from): its rewards then do not start at mean 0, std 1,
    and a KL coefficient weighs them otherwise. None where they match or the record cannot tell (a
    built demo model, a relative path recorded elsewhere)."""
    from align.modeling import builds_model

    recorded = RewardRun.open(reward_model).normalization_policy()
    if recorded is None or builds_model(recorded) or not Path(recorded).is_absolute() or not Path(recorded).exists():
        return None
    if Path(recorded).resolve() == Path(policy).resolve():
        return None
    return (f"the reward model {reward_model} was normalised on samples of {recorded}, not of this run's policy "
            f"{policy}: its rewards do not start at mean 0, std 1 (import or train it again with this policy)")
