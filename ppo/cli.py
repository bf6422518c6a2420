"""`align ppo`. Only typer and the standard library at module level."""

from __future__ import annotations

import typer

from align.cli_common import ConfigOpt, OverridesArg, ResumeOpt


def ppo_command(config: ConfigOpt = None, overrides: OverridesArg = None, resume: ResumeOpt = None) -> None:
    """Align an SFT checkpoint with PPO on LoRA adapters against a reward model."""
    from align.cli_common import resume_hints, resumed_config
    from align.config import load_config
    from align.overrides import warn_given_twice
    from ppo.config import RESUME_OVERRIDABLE, PPOConfig

    overrides = list(overrides or [])
    warn_given_twice(overrides, PPOConfig)
    cfg = (load_config(PPOConfig, config, overrides) if resume is None
           else resumed_config(PPOConfig, resume, config, overrides, RESUME_OVERRIDABLE, "PPO"))

    from ppo.trainer import run_ppo

    with resume_hints(resume):
        summary = run_ppo(cfg, resume=resume is not None)
    if summary:
        shown = {k: v for k, v in summary.items() if k.startswith(("eval/", "objective/"))}
        for key, value in shown.items():
            typer.echo(f"{key:28s} {value:.4f}" if isinstance(value, float) else f"{key:28s} {value}")
        from ppo.evaluation import kl_budget_note

        if note := kl_budget_note(summary, cfg.kl.target, cfg.kl.adaptive, cfg.kl.coef):
            typer.echo(note)
        typer.echo(f"run directory: {cfg.output_dir}")
