"""Which lines of an imported rankings file a project holds already.

One account's rankings of one prompt are a history of revisions (`History`). A line of a
file that carries its revision number (every kwise export does) is stored already when the
account holds that revision with the same ranking; a line without one is stored already
when it equals the account's latest ranking, or when the file's lines for that account and
prompt are the last of its history (the same file sent again). A ranking is its tie groups
in order, the unordered rest of a top-m ranking, its all_bad flag and its rationale: the
same order with a new rationale is a new revision, so the file's last line is the latest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# (tie groups best first, the unordered rest of a top-m ranking, all_bad, rationale)
Key = tuple[tuple[frozenset[int], ...], frozenset[int], bool, "str | None"]


def ranking_key(order: list[list[int]], below: list[int] | None, all_bad: bool, rationale: str | None) -> Key:
    """What makes two rankings of a prompt the same (candidate positions or ids alike)."""
    return tuple(frozenset(g) for g in order), frozenset(below or ()), bool(all_bad), rationale or None


class RevisionConflict(Exception):
    """A file's revision number that the account holds as another ranking."""


@dataclass
class History:
    """One account's rankings of one prompt, stored or planned: revision -> ranking (None:
    a skip, which holds no ranking)."""

    revisions: dict[int, Key | None] = field(default_factory=dict)

    def latest(self) -> Key | None:
        return self.revisions[max(self.revisions)] if self.revisions else None

    def holds(self, key: Key, revision: int | None) -> bool:
        """Whether this ranking is stored: as that revision, or (no revision) as the latest."""
        if revision is not None:
            return self.revisions.get(revision) == key
        return self.latest() == key

    def ends_with(self, keys: list[Key]) -> bool:
        """Whether these rankings, in this order, are the last of the history."""
        rankings = [k for _, k in sorted(self.revisions.items()) if k is not None]
        return 0 < len(keys) <= len(rankings) and rankings[len(rankings) - len(keys):] == keys

    def place(self, key: Key, revision: int | None) -> int | None:
        """The revision a line is stored as (and is planned under), or None when it is a
        duplicate. A file's own revision number is kept, so that the file's lines are
        recognised when it is imported again; one the account holds as another ranking
        raises RevisionConflict."""
        if self.holds(key, revision):
            return None
        if revision is None:
            revision = max(self.revisions, default=0) + 1
        elif revision in self.revisions:
            raise RevisionConflict(revision)
        self.revisions[revision] = key
        return revision
