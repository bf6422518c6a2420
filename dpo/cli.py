"""`align dpo`. Only typer and the standard library at module level."""

from __future__ import annotations

import typer

from align.cli_common import ConfigOpt, OverridesArg, ResumeOpt


def dpo_command(config: ConfigOpt = None, overrides: OverridesArg = None, resume: ResumeOpt = None) -> None:
    """Align an SFT checkpoint on the rankings directly: DPO under the Plackett-Luce model, on LoRA."""
    from align.cli_common import resume_hints, resumed_config
    from align.config import load_config
    from align.overrides import warn_given_twice
    from dpo.config import RESUME_OVERRIDABLE, DPOConfig
    from dpo.train import run_dpo

    overrides = list(overrides or [])
    warn_given_twice(overrides, DPOConfig)
    cfg = (load_config(DPOConfig, config, overrides) if resume is None
           else resumed_config(DPOConfig, resume, config, overrides, RESUME_OVERRIDABLE, "DPO"))
    with resume_hints(resume):
        summary = run_dpo(cfg, echo=typer.echo, resume=resume is not None)
    if not summary:  # a launch's other processes: the main one says it
        return
    typer.echo(f"run directory: {cfg.output_dir}")
    for key in ("eval/accuracy", "eval/kl", "eval/gold_gain_in_sft_std"):
        if key in summary:
            typer.echo(f"{key:28s} {summary[key]:.4f}")
