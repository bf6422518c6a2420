"""`align ppo`. Only typer and the standard library at module level."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from align.cli_common import ConfigOpt, OverridesArg
from align.errors import UserError

# Settings that may change when a run is resumed: none of them changes the training math.
RESUME_OVERRIDABLE = {"progress", "report_to", "wandb_project", "eval_batch_size", "keep_checkpoints"}

ResumeOpt = Annotated[
    Path | None,
    typer.Option("--resume", help="Continue the run in this directory from its latest checkpoint "
                 "(its config.yaml is used; only progress/report_to/... may be overridden)."),
]


def ppo_command(config: ConfigOpt = None, overrides: OverridesArg = None, resume: ResumeOpt = None) -> None:
    """Align an SFT checkpoint with PPO on LoRA adapters against a reward model."""
    from align.config import load_config
    from ppo.config import PPOConfig

    overrides = list(overrides or [])
    if resume is None:
        cfg = load_config(PPOConfig, config, overrides)
    else:
        if config is not None:
            raise UserError("--resume uses the run's own config.yaml; drop --config")
        if not (resume / "config.yaml").is_file():
            raise UserError(f"{resume}: not a PPO run directory (no config.yaml)")
        for item in overrides:
            key = item.split("=", 1)[0].strip()
            if key not in RESUME_OVERRIDABLE:
                raise UserError(f"{key!r} cannot change on --resume (it would change the run); "
                                f"allowed: {', '.join(sorted(RESUME_OVERRIDABLE))}")
        cfg = load_config(PPOConfig, resume / "config.yaml", [*overrides, f"output_dir={resume}"])

    from ppo.trainer import run_ppo

    summary = run_ppo(cfg, resume=resume is not None)
    if summary:
        shown = {k: v for k, v in summary.items() if k.startswith(("eval/", "objective/"))}
        for key, value in shown.items():
            typer.echo(f"{key:28s} {value:.4f}" if isinstance(value, float) else f"{key:28s} {value}")
        typer.echo(f"run directory: {cfg.output_dir}")
