"""Typer argument types shared by the stage commands (`--config FILE key=value ...`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="YAML config file (defaults apply without one).")
]
OverridesArg = Annotated[
    Optional[list[str]],
    typer.Argument(help="Overrides as key=value or section.key=value, applied after the YAML file.", show_default=False),
]
