"""Typer argument types shared by the stage commands (`--config FILE key=value ...`, `--resume RUN`)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (defaults apply without one).")
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides as key=value or section.key=value, applied after the YAML file.", show_default=False),
]
ResumeOpt = Annotated[
    Path | None,
    typer.Option("--resume", help="Continue the run in this directory from its latest checkpoint "
                 "(its config.yaml is used; only settings that do not change the training may be overridden)."),
]


def resumed_config(cls: type, run: Path, config: Path | None, overrides: list[str], allowed: set[str],
                   stage: str) -> Any:
    """The config of the run directory `run` resumes, from its own config.yaml; `overrides` may set
    only the keys in `allowed` (none of which changes the training math), or restate a value the run has."""
    from align.config import config_to_dict, foreign_keys, load_config
    from align.errors import ConfigError, UserError
    from align.overrides import canonical_key
    from align.run import CONFIG_FILE

    if config is not None:
        raise UserError("--resume uses the run's own config.yaml; drop --config")
    if not (run / CONFIG_FILE).is_file():
        raise UserError(f"{run}: not a {stage} run directory (no config.yaml)")
    def settings(*items: str) -> dict:  # output_dir as the directory it names (runs/x/, ./runs/x: the same)
        values = config_to_dict(load_config(cls, run / CONFIG_FILE, [f"output_dir={run}", *items]))
        return {**values, "output_dir": Path(values["output_dir"]).expanduser().resolve()}

    try:  # the run's own config first: whether RUN is a run of this stage at all
        own = settings()
    except ConfigError as exc:  # another stage's run, or a config.yaml edited into something else
        foreign = foreign_keys(cls, run / CONFIG_FILE)
        if foreign:  # another stage's run: its keys say so, where a "did you mean" would mislead
            raise ConfigError(f"{run}: not a {stage} run to resume (its config.yaml has keys a {stage} run does "
                              f"not: {', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''})") from None
        raise ConfigError(f"{run}: cannot resume: its config.yaml: {exc}{_relative_path_hint(run, str(exc))}") from None
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        key = canonical_key(key, cls)
        if key not in allowed and not _restates(settings, item, own):
            raise UserError(f"{key!r} cannot change on --resume (it would change the run); "
                            f"allowed: {', '.join(sorted(allowed))}")
    return load_config(cls, run / CONFIG_FILE, [*overrides, f"output_dir={run}"])  # a bad override, as itself


def _restates(settings: Any, item: str, own: dict) -> bool:
    """Whether the override `item` gives the run's config a value it has. One that makes the config
    invalid on its own (method=grpo without the samples_per_prompt it needs) changes it."""
    from align.errors import UserError

    try:
        return settings(item) == own
    except UserError:
        return False


@contextlib.contextmanager
def resume_hints(run: Path | None) -> Iterator[None]:
    """Around a resumed run (`run`: its directory; None: a fresh run, left alone): a file its config
    names by a relative path and that is not found says where such a path is read from."""
    from align.errors import UserError

    try:
        yield
    except UserError as exc:
        hint = _relative_path_hint(run, str(exc)) if run is not None else ""
        if not hint:
            raise
        raise UserError(f"{exc}{hint}") from None


def _relative_path_hint(run: Path, problem: str) -> str:
    """Where the problem is a file the run's config names by a relative path: such a path is read
    from the current folder, so a run started elsewhere is resumed from the folder it started in."""
    from align.config import ConfigError, read_yaml_mapping
    from align.run import CONFIG_FILE

    def strings(value: Any) -> list[str]:
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        return [value] if isinstance(value, str) else []

    try:
        values = strings(read_yaml_mapping(run / CONFIG_FILE))
    except ConfigError:
        return ""
    for value in values:
        named = re.search(rf"not found: {re.escape(value)}(?:$|[\s,;)])", problem)  # the whole path, not a prefix
        if named and not Path(value).is_absolute() and not value.startswith("~"):
            return (f" ({value} is relative to the folder the run was started in: resume from that folder, or "
                    "put the file back)")
    return ""


def config_keys_help(cls: type, intro: str | None = None) -> str:
    """Every key of a stage config with its type, default and help, for the command's `--help`.

    Built from the config dataclass itself (`align.config.describe`), so the listing cannot
    drift from what the loader accepts. Paragraphs are separated by blank lines because
    typer's rich help joins single line breaks.
    """
    import yaml
    from rich.markup import escape

    from align.config import describe

    parts = [intro or "[bold]Config keys[/bold] (in the YAML file, nested keys under their section; or as key=value after it, nested keys with dots: section.key=value; a value beginning with ~/ is a path in your home directory):"]
    aliases: dict[str, list[str]] = {}
    for alias, key in getattr(cls, "key_aliases", {}).items():
        aliases.setdefault(key, []).append(alias)
    for key, type_name, default, help_text in describe(cls):
        also = f" Also read as: {', '.join(aliases[key])}." if key in aliases else ""
        parts.append(f"[bold]{escape(key)}[/bold] ({escape(type_name)}, default {escape(yaml.safe_dump(default, default_flow_style=True).removesuffix(chr(10)).removesuffix('...').strip())}): {escape(help_text + also)}")
    return "\n\n".join(parts)
