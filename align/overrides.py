"""`key=value` overrides of a stage config, applied in order over its YAML: each value read as
YAML reads it and kept as typed (a text field takes the text), a dotted key into its section, a
mapping given for a section merged into it key by key (`kl={coef: 0.3}` keeps the YAML's other
`kl` keys); a setting the user gives two values takes the last, with a warning (`warn_given_twice`)."""

from __future__ import annotations

import dataclasses
import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from align.errors import ConfigError

_NoneType = type(None)
log = logging.getLogger("align")


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type) -> None:
    """Set each `key=value` of `overrides` into `data` (the YAML's mapping), in order: a later one
    wins (a command puts its own settings before the user's, or after those it fixes)."""
    for override in overrides:
        key, value = parse_override(override)
        for leaf, leaf_value in _settings(key, value, cls, lambda name: key_of_alias(name, cls)):
            set_dotted(data, leaf, leaf_value, cls)


def warn_given_twice(overrides: list[str], cls: type) -> None:
    """A setting the user's overrides give two values (`seed=1 seed=2`, a key under two of its names,
    or dotted and in its section's mapping) takes the last, as scripts that append overrides expect,
    and a warning names both, so that neither passes unseen."""
    given: dict[str, tuple[str, Any]] = {}  # each setting (its dotted key) -> the override giving it, its value
    for override in overrides:
        key, value = parse_override(override)
        for leaf, leaf_value in _settings(key, value, cls, lambda name: canonical_key(name, cls)):
            plain = leaf_value.parsed if isinstance(leaf_value, OverrideValue) else leaf_value
            if leaf in given and given[leaf][1] != plain:
                log.warning("config key %r is given twice (%r, then %r): the last is taken", leaf, given[leaf][0],
                            override)
            given[leaf] = (override, plain)


def _settings(key: str, value: OverrideValue, cls: type, rename: Callable[[str], str]) -> list[tuple[str, Any]]:
    """The settings an override gives, by their keys (`rename`: a former name to the key): itself, or
    where its value is a mapping for a section of `cls`, each key of it (the section's others stay)."""
    key = rename(key)
    if _section_type(key, cls) is None or not isinstance(value.parsed, dict):
        return [(key, value)]
    out: list[tuple[str, Any]] = []
    for name, inner in value.parsed.items():
        out.extend(_settings(f"{key}.{name}", OverrideValue(inner, yaml.safe_dump(inner).strip()), cls, rename)
                   if isinstance(inner, dict) else [(rename(f"{key}.{name}"), inner)])
    return out


def _section_type(key: str, cls: type) -> type | None:
    """The dataclass of the section `key` names in `cls`, or None where it names no section."""
    tp: Any = cls
    for part in key.split("."):
        hints = get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return None
        tp = hints[part]
    return tp if dataclasses.is_dataclass(tp) else None


def key_of_alias(name: str, cls: type) -> str:
    """The key `name` stands for: itself, or the key it is another name of (with a warning)."""
    key = canonical_key(name, cls)
    if key != name:
        log.warning("config key %r is read as %r, its name in %s", name, key, cls.__name__)
    return key


def canonical_key(name: str, cls: type) -> str:
    """The key `name` stands for in `cls`, without a word (`key_of_alias` says it)."""
    return getattr(cls, "key_aliases", {}).get(name, name)


@dataclass(frozen=True)
class OverrideValue:
    """The value of a `key=value` override: as YAML reads it (`true`, `3`, `[1, 2]`), and the text as
    typed, which a text field (a path, a name, a choice) takes as it is: in `output_dir=run #2` the `#`
    starts no comment, `2024-12-05` is no date, `on` is no boolean."""

    parsed: Any
    text: str

    def for_type(self, tp: Any) -> Any:
        quoted = len(self.text) >= 2 and self.text[0] == self.text[-1] and self.text[0] in "'\""
        if self.text == "~" and (tp is str or tp is Path):  # a text that cannot be null: the home directory
            return self.text
        if quoted or self.parsed is None:  # 'x' "x": YAML unquotes; empty or null (~ of `str | None`): None
            return self.parsed
        if get_origin(tp) in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not _NoneType]
            tp = args[0] if len(args) == 1 else None
        if tp is str or tp is Path or (get_origin(tp) is Literal and self.text in get_args(tp)):
            return self.text  # `a: b` and `[x]` are text too
        return self.parsed


def parse_override(text: str) -> tuple[str, OverrideValue]:
    """`lr=1e-5` -> ("lr", OverrideValue(1e-05, "1e-5")): read as a YAML scalar or list, kept as typed too."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal text, the field's type decides
    return key, OverrideValue(value, raw.strip())


def set_dotted(data: dict[str, Any], key: str, value: Any, cls: type) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, OverrideValue):  # a section given whole by an earlier override
            child = node[part] = child.parsed
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[: i + 1])!r} is not a section")
        node = child
    node[parts[-1]] = value
