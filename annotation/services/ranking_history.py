"""Which lines of an imported rankings file a project holds already.

One account's rankings of one prompt are a history of revisions (`History`). A line of a
file that carries its revision number (every kwise export does) is held already when the
account holds that revision with the same ranking. A line without one is held already when
the account held the same ranking before this import began, at any revision, or when it repeats
the latest: importing a file again (or one that grew, or one an import cut short) adds only
what is new, and lines of one file are placed in their order (A, B, A: three revisions, the
last A the latest; A, A: one). A
ranking is its tie groups in order, the unordered rest of a top-m ranking, its all_bad flag
and its rationale: the same order with a new rationale is a new revision.
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
    """One account's rankings of one prompt: revision -> ranking (None: a skip, which holds
    no ranking), those stored before this import and those it places (`placed`)."""

    revisions: dict[int, Key | None] = field(default_factory=dict)
    placed: set[int] = field(default_factory=set)

    def holds(self, key: Key, revision: int | None) -> bool:
        """Whether this ranking is held: as that revision, or (no revision) at any revision
        stored before this import, or as the latest (a line repeated in the file)."""
        if revision is not None:
            return self.revisions.get(revision) == key
        latest = self.revisions[max(self.revisions)] if self.revisions else None
        return key == latest or any(k == key for rev, k in self.revisions.items() if rev not in self.placed)

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
        self.placed.add(revision)
        return revision
