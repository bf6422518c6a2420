"""Checks of the text and parsed JSON that users' files bring in: what a tokenizer, UTF-8 output
and the annotation app's database can hold (a lone surrogate, a NUL, NaN, nesting without end)."""

from __future__ import annotations

import math
import re
from typing import Any

from align.errors import UserError


def check_json_value(value: Any, where: str, depth: int = 0) -> Any:
    """`value` (parsed JSON) if a database can hold it: finite numbers (Python's JSON reads
    NaN and Infinity, which are not JSON and PostgreSQL refuses), strings without NUL or
    lone surrogates, nested at most 32 deep."""
    if depth > 32:
        raise UserError(f"{where}: nested more than 32 deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where}: {value} is not a finite number")
    if isinstance(value, str) and text_problem(value):
        raise UserError(f"{where}: {text_problem(value)}")
    if isinstance(value, dict):
        for k, v in value.items():
            check_json_value(k, where, depth + 1)
            check_json_value(v, where, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_json_value(v, where, depth + 1)
    return value


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
LONE_SURROGATE = "contains a lone surrogate (not UTF-8 text)"


def text_problem(text: str) -> str | None:
    """Why a database cannot store `text` (a NUL, or a lone surrogate, which is not UTF-8),
    or None."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    return "contains a NUL character" if found.group() == "\x00" else LONE_SURROGATE


def has_lone_surrogate(value: Any) -> bool:
    """Whether a string in `value` (parsed JSON, keys included) holds a lone surrogate: JSON's
    "\\ud800" reads as one, and a tokenizer, or writing it back as UTF-8, stops on it. NUL is
    text to both, so only a database refuses it (`text_problem`)."""
    stack = [value]
    while stack:  # a loop, not recursion: json.loads reads lists nested deeper than the frames left here
        v = stack.pop()
        if isinstance(v, str):
            if _LONE_SURROGATE.search(v):
                return True
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def refuse_lone_surrogates(row: dict, where: str) -> dict:
    """`row` (a JSONL line's object), or a UserError naming `where` and the field holding a
    lone surrogate."""
    for key, value in row.items():
        if has_lone_surrogate(key):
            raise UserError(f"{where}: a field name {LONE_SURROGATE}")
        if has_lone_surrogate(value):
            raise UserError(f"{where}: {key!r} {LONE_SURROGATE}")
    return row
