"""Typer argument types shared by the stage commands (`--config FILE key=value ...`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (defaults apply without one).")
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides as key=value or section.key=value, applied after the YAML file.", show_default=False),
]


def config_keys_help(cls: type) -> str:
    """Every key of a stage config with its type, default and help, for the command's `--help`.

    Built from the config dataclass itself (`align.config.describe`), so the listing cannot
    drift from what the loader accepts. Paragraphs are separated by blank lines because
    typer's rich help joins single line breaks.
    """
    import yaml
    from rich.markup import escape

    from align.config import describe

    parts = ["[bold]Config keys[/bold] (in the YAML file, or as key=value after it; nested keys with dots):"]
    for key, type_name, default, help_text in describe(cls):
        parts.append(f"[bold]{escape(key)}[/bold] ({escape(type_name)}, default {escape(yaml.safe_dump(default, default_flow_style=True).removesuffix(chr(10)).removesuffix('...').strip())}): {escape(help_text)}")
    return "\n\n".join(parts)
