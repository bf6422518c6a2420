"""`align ppo`. Only typer and the standard library at module level."""

from __future__ import annotations

from align.cli_common import ConfigOpt, OverridesArg
from align.errors import UserError


def ppo_command(config: ConfigOpt = None, overrides: OverridesArg = None) -> None:
    """Align an SFT checkpoint with PPO on LoRA adapters against a reward model."""
    raise UserError("align ppo is being built (issue 5)")
