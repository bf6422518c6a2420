"""`align annotate ...` commands. Only typer and the standard library at module level."""

from __future__ import annotations

import typer

from align.errors import UserError

app = typer.Typer(no_args_is_help=True)


@app.command("serve")
def serve() -> None:
    """Serve the annotation web app."""
    raise UserError("align annotate serve is being built (issue 3)")
