"""Which lines of an imported rankings file a project holds already, and whether a revision
sent through the API repeats the annotator's latest (`repeats`: then it stores nothing).

One account's rankings of one prompt are a history of revisions (`History`). A line of a
file that carries its revision number (every kwise export does) is held already when the
account holds that revision with the same ranking. The lines without one, for an account and
a prompt, are read in the file's order against the rankings the account held before the
import: as long as each is found later in that history than the one before it, they are held
(the same file again, one that grew, one an import cut short, an older delivery sent again);
from the first that is not, every line is a new revision, unless it repeats the latest (A, A:
one). So A, B, A in one file is three revisions, the last A the latest, and importing it again
after a cut at A, B adds the last A. A ranking is its tie groups in order, the unordered rest of
a top-m ranking, its all_bad flag and its rationale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from annotation.models import RankingRow

# (tie groups best first, the unordered rest of a top-m ranking, all_bad, rationale)
Key = tuple[tuple[frozenset[int], ...], frozenset[int], bool, "str | None"]


def ranking_key(order: list[list[int]], below: list[int] | None, all_bad: bool, rationale: str | None) -> Key:
    """What makes two rankings of a prompt the same (candidate positions or ids alike)."""
    return tuple(frozenset(g) for g in order), frozenset(below or ()), bool(all_bad), rationale or None


class Revision(NamedTuple):
    """What a revision request left: the annotator's latest ranking of the task, and whether
    the request stored it (False: it was the same as the latest, which stays as it was)."""

    row: RankingRow
    stored: bool


def latest_revision(db: Session, assignment_id: int) -> RankingRow | None:
    """The task's latest ranking (its annotator's: a task is one annotator's lease of a prompt)."""
    return db.scalar(select(RankingRow).where(RankingRow.assignment_id == assignment_id)
                     .order_by(RankingRow.revision.desc()).limit(1))


def repeats(latest: RankingRow | None, order: list[list[int]], below: list[int] | None, all_bad: bool,
            rationale: str | None) -> bool:
    """Whether a revision sent is the same ranking as the latest (`ranking_key`: the time spent
    is not part of it, nor the order of ids within a tie): a request sent again, say by a
    client that retried a PUT whose answer it did not get."""
    return latest is not None and not latest.skipped and ranking_key(
        latest.order, latest.below, latest.all_bad, latest.rationale) == ranking_key(order, below, all_bad, rationale)


class RevisionConflict(Exception):
    """A file's revision number that the account holds as another ranking."""


@dataclass
class History:
    """One account's rankings of one prompt: revision -> ranking (None: a skip, which holds
    no ranking), those stored before this import and those it places."""

    revisions: dict[int, Key | None] = field(default_factory=dict)
    earlier: list[Key] | None = None  # the rankings held before the import, in order, not yet read past
    diverged: bool = False  # a line without a revision number was not found in them: the rest are new

    def holds(self, key: Key, revision: int) -> bool:
        """Whether the account holds this ranking as that revision."""
        return self.revisions.get(revision) == key

    def follows(self, key: Key) -> bool:
        """Whether a line without a revision number is held: found in the rankings held before the
        import, after the one the previous such line was found at (which it then moves past)."""
        if self.diverged:
            return False
        if self.earlier is None:
            self.earlier = [k for _, k in sorted(self.revisions.items()) if k is not None]
        if key in self.earlier:
            del self.earlier[: self.earlier.index(key) + 1]
            return True
        return False

    def place(self, key: Key, revision: int | None) -> int | None:
        """The revision a line is stored as, or None when it repeats the latest (a line without a
        revision number). A file's own revision number is kept, so that the file's lines are
        recognised when it is imported again; one the account holds as another ranking raises
        RevisionConflict."""
        if revision is None:
            self.diverged = True
            if self.revisions and self.revisions[max(self.revisions)] == key:
                return None
            revision = max(self.revisions, default=0) + 1
        elif revision in self.revisions:
            raise RevisionConflict(revision)
        self.revisions[revision] = key
        return revision
