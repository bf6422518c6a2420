"""`align reward ...` commands. Only typer and the standard library at module level."""

from __future__ import annotations

import typer

from align.cli_common import ConfigOpt, OverridesArg
from align.errors import UserError

app = typer.Typer(no_args_is_help=True)


@app.command("train")
def train(config: ConfigOpt = None, overrides: OverridesArg = None) -> None:
    """Train a reward model on K-wise rankings (InstructGPT loss)."""
    raise UserError("align reward train is being built (issue 4)")
