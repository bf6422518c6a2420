"""Preference data formats shared by annotation import/export and reward training.

The unit of preference data in align is a `Ranking`: one annotator's order of K responses
to one prompt, ties allowed. InstructGPT trains on the ranking itself (one batch element
per ranking); pairwise formats (TRL, HH-RLHF) are rankings with K = 2.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from align.errors import UserError


@dataclass
class Ranking:
    """One annotator's ranking of K responses to one prompt."""

    prompt: str | list[dict[str, str]]  # prompt text, or chat messages ending with a user turn
    responses: list[str]  # the K candidate responses
    ranks: list[int]  # rank of each response, 0 = best; equal ranks are ties
    annotator: str | None = None
    prompt_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # anything else the source carried

    def __post_init__(self) -> None:
        if len(self.responses) != len(self.ranks):
            raise ValueError(f"{len(self.responses)} responses but {len(self.ranks)} ranks")

    def ordered_pairs(self) -> list[tuple[int, int]]:
        """(winner, loser) index pairs implied by the ranking; a tie implies no pair."""
        k = len(self.ranks)
        return [(w, l) for w in range(k) for l in range(k) if self.ranks[w] < self.ranks[l]]


def write_kwise(rankings: list[Ranking], path: str | Path) -> None:
    with Path(path).open("w", encoding="utf-8") as f:
        for r in rankings:
            row = asdict(r)
            row.update(row.pop("meta"))
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_kwise(path: str | Path) -> list[Ranking]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            known = {k: row.pop(k) for k in ("prompt", "responses", "ranks", "annotator", "prompt_id") if k in row}
            out.append(Ranking(**known, meta=row))
        except (json.JSONDecodeError, TypeError, ValueError) as exc:
            raise UserError(f"{path}:{lineno}: not a kwise ranking line ({exc})") from None
    return out
