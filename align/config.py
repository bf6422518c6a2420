"""Typed stage configs: YAML first, then `key=value` overrides from the CLI.

Every stage (reward training, PPO, ...) has one dataclass whose fields are declared with
`option(...)`, which carries the field's documentation and its valid range, in the manner
of TRL's config dataclasses. `load_config` builds such a dataclass from a YAML file and a
list of `key=value` / `nested.key=value` overrides and refuses, with one line naming the
key, anything it does not understand: an unknown key (with the closest valid key for a
typo), a value of the wrong type, a value out of range, a file that does not exist.
Nothing is silently rewritten: the resolved config is exactly what the user asked for, and
`save_config` writes it into the run directory. A key given under another name (`key_aliases`: a
former name, TRL's) goes to the key with a warning naming both. The one reading a shell would do is
`~`: a text value that is `~` or begins with `~/` is a path in the home directory and is expanded (in a quoted
override or a YAML file no shell did it). Paths are plain `str` fields, so the rule is the value's,
not the field's; no text field of align takes such a value with another meaning.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from align.errors import ConfigError
from align.overrides import OverrideValue, apply_overrides, key_of_alias, set_dotted

T = TypeVar("T")
_NoneType = type(None)
log = logging.getLogger("align")


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    default_factory: Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    must_exist: bool = False,
) -> Any:
    """A documented config field with an optional range (`ge`/`gt`/`le`/`lt`).

    `must_exist=True` marks a path that has to exist when the config is loaded.
    """
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "must_exist": must_exist}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


# --------------------------------------------------------------------------- loading


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                base: Mapping[str, Any] | None = None) -> T:
    """Build `cls` from `base` (values a command sets from its own options), an optional YAML file over
    it, then `key=value` overrides in order."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        path = locate_config(path)
        data.update(mapping := read_yaml_mapping(path))
        dotted = _dotted_key(data, cls)
        if dotted:
            *sections, leaf = dotted.split(".")
            nesting = ", then ".join([f"{sections[0]}:", *(f"{p}: indented below it" for p in [*sections[1:], leaf])])
            raise ConfigError(f"{path}: {dotted!r}: dotted keys are for key=value overrides; in a YAML file write it "
                              f"as a nested section ({nesting})")
        foreign = foreign_keys(cls, mapping)
        if len(foreign) >= 2:  # another stage's config: no "did you mean" for one of its keys
            raise ConfigError(f"{path}: not a config of this command ({cls.__name__}): it sets "
                              f"{', '.join(map(repr, foreign[:5]))}, which it has no keys for (another stage's config?)")
        _move_aliased_values(data, cls, str(path))
    apply_overrides(data, overrides or [], cls)
    return from_dict(cls, data)


def locate_config(path: str | Path) -> Path:
    """`path`; or, where no such file is here and it names one of the configs align ships as the README
    writes them (`configs/real/ppo.yaml`, from a folder other than a checkout), that one, with a line
    saying so. A file of that name in the folder always comes first."""
    path = Path(path)
    if path.exists() or path.is_absolute() or len(path.parts) < 2 or path.parts[0] != "configs":
        return path
    from align.resources import configs_dir

    shipped = configs_dir().joinpath(*path.parts[1:])
    if not shipped.is_file():
        return path
    log.info("%s is not in this folder: reading the config align ships, %s", path, shipped)
    return shipped


def _move_aliased_values(data: dict[str, Any], cls: type, source: str) -> None:
    """Move values a YAML mapping gives under another name of a key (`key_aliases`) to the key; the
    same setting given under both names is refused."""
    def holder(key: str) -> dict[str, Any] | None:  # the mapping that holds `key`'s leaf, if any
        node: Any = data
        for part in key.split(".")[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        return node if isinstance(node, dict) and key.rsplit(".", 1)[-1] in node else None

    for alias in getattr(cls, "key_aliases", {}):
        if (node := holder(alias)) is not None:
            value, key = node.pop(alias.rsplit(".", 1)[-1]), key_of_alias(alias, cls)
            if holder(key) is not None:
                raise ConfigError(f"{source}: {alias!r} and {key!r} are one setting; give {key!r} only")
            set_dotted(data, key, value, cls)


def _dotted_key(data: Mapping[str, Any], cls: type, prefix: str = "") -> str | None:
    """The first key of a YAML mapping written with dots (`kl.coef: 0.1`) that names a nested key of
    `cls`; an unknown one is left to `from_dict`, which suggests the nearest key."""
    hints = get_type_hints(cls)
    for key, value in data.items():
        if not isinstance(key, str):
            continue
        if "." in key and f"{prefix}{key}" in all_keys(cls, prefix):
            return f"{prefix}{key}"
        if key in hints and dataclasses.is_dataclass(hints[key]) and isinstance(value, Mapping):
            found = _dotted_key(value, hints[key], f"{prefix}{key}.")
            if found:
                return found
    return None


def check_input_file(value: str | Path, key: str) -> None:
    """`value` of the config key `key` must be a readable file: else one line saying what it is instead
    (not found, a directory: align.files.input_file_problem's words)."""
    from align.files import input_file_problem

    problem = input_file_problem(value)
    if problem:
        raise ConfigError(f"{key}: {problem}")


def foreign_keys(cls: type, source: str | Path | Mapping[str, Any]) -> list[str]:
    """Top-level keys of the YAML mapping at `source` (or of the mapping) that the config class `cls` has
    no field for, and no close spelling of one (a typo is not another stage's key); [] if it cannot be read."""
    try:
        mapping = source if isinstance(source, Mapping) else read_yaml_mapping(source)
    except ConfigError:
        return []
    fields = [f.name for f in dataclasses.fields(cls)] + [a.split(".")[0] for a in getattr(cls, "key_aliases", {})]
    return [key for key in mapping if key not in fields and not difflib.get_close_matches(str(key), fields, n=1)]


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        from align.files import input_file_problem

        raise ConfigError(f"config {input_file_problem(path)}")  # "config file not found: X", "config X is a directory ..."
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (a binary file?)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}")
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    value, so the first would be silently ignored (the YAML spec requires unique keys)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[tuple[type, Any], int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: explicit keys override merged ones
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # (a list or mapping as a key: PyYAML refuses it itself)
            seen = (type(key), key)  # `1` and `true` are two keys
            if seen in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first_line[seen]})", key_node.start_mark)
            first_line[seen] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def from_dict(cls: type[T], data: Mapping[str, Any], _prefix: str = "", _root: type | None = None) -> T:
    root = _root or cls
    hints = get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{_prefix}{key}"
        if key not in known:
            while isinstance(value, Mapping) and len(value) == 1:  # `train.report_to` where the key is `report_to`
                (inner, value), = value.items()
                full = f"{full}.{inner}"
            raise ConfigError(_unknown_key_message(full, root))
        f = known[key]
        value = _coerce(value, hints[key], full, root)
        _check_range(value, f.metadata, full)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError:  # a required field without a default was not given
        missing = [n for n, f in known.items() if n not in kwargs and _is_required(f)]
        if missing:
            raise ConfigError(f"missing required config key {_prefix}{missing[0]!r}") from None
        raise


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _coerce(value: Any, tp: Any, key: str, root: type) -> Any:
    if isinstance(value, OverrideValue):
        value = value.for_type(tp)
    origin = get_origin(tp)
    if tp is Any:
        return value
    if isinstance(value, Mapping) and not _takes_mapping(tp):  # `lr.x=1`, or `lr:` with keys below it
        below = f", so '{key}.{next(iter(value))}' is no config key" if value else ""
        raise ConfigError(f"{key} is not a section (it takes {_type_name(tp)}){below}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and _NoneType in args:
            return None
        errors = []
        for arg in (a for a in args if a is not _NoneType):
            try:
                return _coerce(value, arg, key, root)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if value is None:
        raise ConfigError(f"{key}: a value is required (got null)")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, f"{key}.", root)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]", root) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # PyYAML reads `1e-5` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # no setting of align means "without bound" by inf, and NaN is none
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str or tp is Path:
        if isinstance(value, str) and (value == "~" or value.startswith("~/")):
            return os.path.expanduser(value)  # every text field that takes a path; see the module's docstring
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _takes_mapping(tp: Any) -> bool:
    args = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    return any(a is Any or a is dict or get_origin(a) is dict or dataclasses.is_dataclass(a) for a in args)


def _check_range(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("ge") is not None and not value >= meta["ge"]:
            raise ConfigError(f"{key}: must be >= {meta['ge']}, got {value}")
        if meta.get("gt") is not None and not value > meta["gt"]:
            raise ConfigError(f"{key}: must be > {meta['gt']}, got {value}")
        if meta.get("le") is not None and not value <= meta["le"]:
            raise ConfigError(f"{key}: must be <= {meta['le']}, got {value}")
        if meta.get("lt") is not None and not value < meta["lt"]:
            raise ConfigError(f"{key}: must be < {meta['lt']}, got {value}")
    if meta.get("must_exist") and value is not None:
        check_input_file(value, key)


# --------------------------------------------------------------------------- introspection


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key a config class accepts (sections and leaves)."""
    keys = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        keys.append(prefix + f.name)
        tp = hints[f.name]
        for candidate in (tp, *get_args(tp)):
            if dataclasses.is_dataclass(candidate):
                keys.extend(all_keys(candidate, f"{prefix}{f.name}."))
    return keys


def _unknown_key_message(key: str, root: type) -> str:
    keys = all_keys(root)
    match = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not match:  # a typo in the last part of a nested key, or a leaf named without its section
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        match = [by_leaf[near[0]]] if near else []
    hint = f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(k for k in keys if '.' not in k)}"
    return f"unknown config key {key!r} for {root.__name__}{hint}"


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every leaf field, for `--help`-style listings."""
    rows = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, f"{prefix}{f.name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((prefix + f.name, _type_name(tp), default, f.metadata.get("help", "")))
    return rows


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is _NoneType:
        return "null"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------- shared option groups


@dataclass
class LoraOptions:
    """A LoRA adapter (Hu et al. 2021): the update W + (alpha / r) * B A on the chosen linear layers."""

    r: int = option(16, help="LoRA rank.", ge=1)
    alpha: float = option(32.0, help="LoRA alpha (the update is scaled by alpha / r).", gt=0)
    dropout: float = option(
        0.0,
        help="LoRA dropout, in the reward stage. PPO, RLOO, GRPO and DPO refuse any other value than 0: their "
        "updates compare log-probs of the same policy computed at different times.",
        ge=0.0,
        lt=1.0,
    )
    target_modules: list[str] = option(
        default_factory=lambda: ["all-linear"],
        help="['all-linear'] (every linear layer of every transformer block, for any family: Llama's q/k/v/o_proj "
        "and MLP, GPT-2's c_attn/c_proj/c_fc, GPT-NeoX's query_key_value, ...; never the lm_head or reward head), "
        "or names of linear layers (PEFT's suffix match). A name that matches no linear layer, or a list that "
        "leaves a block without an adapter, stops the run with the model's linear layer names. An MoE model's "
        "fused routed experts are not linear layers and get no adapter (a warning says so).",
    )


# --------------------------------------------------------------------------- saving


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def config_yaml(cfg: Any) -> str:
    """The resolved config as YAML; loading it back gives an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (`config_yaml`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_yaml(cfg), encoding="utf-8")
    return path


def check(condition: bool, message: str) -> None:
    """Cross-field validation inside a config's `__post_init__`."""
    if not condition:
        raise ConfigError(message)


__all__ = [
    "option",
    "load_config",
    "from_dict",
    "config_yaml",
    "save_config",
    "config_to_dict",
    "describe",
    "all_keys",
    "check",
    "ConfigError",
    "LoraOptions",
]
