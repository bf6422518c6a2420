"""The layout of a DPO run directory, as `align dpo` writes it.

    RUN/config.yaml      the resolved DPOConfig
    RUN/metrics.jsonl    one line per `log_every` steps (train/...)
    RUN/summary.json     held-out ranking accuracy of the implicit reward (eval/accuracy ...), and the
                         held-out samples' KL and gold gain (eval/kl, eval/gold_* ...)
    RUN/samples.jsonl    held-out prompts with SFT and policy responses
    RUN/data.json        the rankings trained on (format, absolute path, sha256, split) and the config
    RUN/policy/          the LoRA adapter + tokenizer (base = absolute SFT path): the layout of a PPO
                         run's policy, so `align export` reads both the same way
    RUN/tensorboard/     report_to=tensorboard's events (align.tracking)
    RUN/checkpoints/step-NNNNNN/  the adapter, optimiser, scheduler and step (align.checkpoint), every
                         `save_every` steps; `align dpo --resume RUN` continues from the latest
"""

from __future__ import annotations

from pathlib import Path

from align.provenance import MODELS_RECORD_FILE
from align.run import SUMMARY_FILE
from align.tracking import TRACKER_OUTPUTS
from ppo.run_dir import POLICY_DIR, SAMPLES_FILE

DATA_FILE = "data.json"
STAGE_FILE = "stage.txt"  # "dpo": tells a DPO run from a PPO run of the same layout
# what a run writes besides its config, metrics and checkpoints: a fresh run into an earlier run's
# directory (overwrite=true) removes them first (align.checkpoint.clear_earlier_run)
OUTPUTS = (SUMMARY_FILE, SAMPLES_FILE, POLICY_DIR, DATA_FILE, MODELS_RECORD_FILE, *TRACKER_OUTPUTS)

__all__ = ["DATA_FILE", "POLICY_DIR", "SAMPLES_FILE", "STAGE_FILE", "is_dpo_run"]


def is_dpo_run(path: str | Path) -> bool:
    stage = Path(path) / STAGE_FILE
    return stage.is_file() and stage.read_text(encoding="utf-8").strip() == "dpo"
