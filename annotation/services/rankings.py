"""Task leasing and rankings: who ranks which prompt next, and storing what they sent."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from annotation.models import Assignment, Candidate, Project, Prompt, RankingRow, User
from annotation.services._tx import read_only, unit_of_work
from annotation.services.errors import Conflict, Forbidden, Invalid, NotFound
from annotation.services.users import require_annotator

MAX_REASON = 2_000
MAX_DB_INT = 2**31 - 1  # INTEGER columns on PostgreSQL (and what ids are checked against everywhere)
STALE_CHECK_S = 2.0
_last_stale_check: dict[tuple[str, int], float] = {}


def ranks_to_order(candidate_ids: list[int], ranks: list[int]) -> list[list[int]]:
    """[c1, c2, c3], ranks [1, 0, 1] -> [[c2], [c1, c3]] (tie groups, best first)."""
    groups: dict[int, list[int]] = {}
    for cid, rank in zip(candidate_ids, ranks):
        groups.setdefault(int(rank), []).append(cid)
    return [groups[r] for r in sorted(groups)]


def order_to_ranks(candidate_ids: list[int], order: list[list[int]]) -> list[int]:
    """Inverse of ranks_to_order with dense ranks: rank = index of the tie group."""
    rank_of = {cid: g for g, group in enumerate(order) for cid in group}
    return [rank_of[cid] for cid in candidate_ids]


def validate_order(order: Any, candidate_ids: list[int]) -> list[list[int]]:
    """The order must be a list of non-empty groups of candidate ids that together hold each
    of the task's candidates exactly once. Raises Invalid saying what is wrong. Linear in
    the input, and it stops reading once more ids than the task's K were sent."""
    if not isinstance(order, list) or not order:
        raise Invalid("order must be a non-empty list of groups of candidate ids, best first")
    k = len(candidate_ids)
    seen: set[int] = set()
    dupes: set[int] = set()
    groups: list[list[int]] = []
    total = 0
    for group in order:
        if isinstance(group, int) and not isinstance(group, bool):
            group = [group]
        if not isinstance(group, list) or not group:
            raise Invalid("each entry of order must be a candidate id or a non-empty list of candidate ids (a tie)")
        total += len(group)
        if total > 2 * k:
            raise Invalid(f"order names {total}+ ids; this task has {k} candidates")
        for c in group:
            if not isinstance(c, int) or isinstance(c, bool):
                raise Invalid("candidate ids must be integers")
            (dupes if c in seen else seen).add(c)
        groups.append(list(group))
    if dupes:
        raise Invalid(f"candidate ids appear more than once: {sorted(dupes)}")
    unknown = sorted(seen - set(candidate_ids))
    if unknown:
        raise Invalid(f"candidate ids not in this task: {unknown}")
    missing = sorted(set(candidate_ids) - seen)
    if missing:
        raise Invalid(f"order leaves out candidate ids {missing}; rank every candidate (ties allowed)")
    return groups


@dataclass
class TaskCandidate:
    id: int
    text: str


@dataclass
class Task:
    """What one annotator sees for one prompt: candidates in their own shuffled order."""

    assignment_id: int
    project: str
    prompt_id: int
    prompt: Any  # text or messages
    candidates: list[TaskCandidate]
    status: str
    leased_until: float
    guidelines: str = ""
    revision: int = 0  # latest stored revision (0 = not ranked yet)
    order: list[list[int]] | None = None  # latest stored order, if ranked


def _task(db: Session, a: Assignment, project: Project, prompt: Prompt) -> Task:
    by_id = {c.id: c for c in prompt.candidates}
    latest = db.scalar(
        select(RankingRow).where(RankingRow.assignment_id == a.id).order_by(RankingRow.revision.desc()).limit(1)
    )
    return Task(
        assignment_id=a.id, project=project.name, prompt_id=prompt.id, prompt=prompt.content,
        candidates=[TaskCandidate(cid, by_id[cid].text) for cid in a.candidate_order if cid in by_id],
        status=a.status, leased_until=a.leased_until, guidelines=project.guidelines,
        revision=latest.revision if latest else 0, order=latest.order if latest and not latest.skipped else None,
    )


@unit_of_work
def release_expired_leases(db: Session, project: Project, now: float | None = None) -> int:
    """Give back the slots of leases that ran out (commits)."""
    now = time.time() if now is None else now
    stale = db.execute(
        select(Assignment.id, Assignment.prompt_id).where(
            Assignment.project_id == project.id, Assignment.status == "leased", Assignment.leased_until < now
        ).limit(200)
    ).all()
    released = 0
    for aid, pid in stale:
        res = db.execute(update(Assignment).where(Assignment.id == aid, Assignment.status == "leased").values(status="expired"))
        if res.rowcount == 1:
            db.execute(update(Prompt).where(Prompt.id == pid).values(slots_taken=Prompt.slots_taken - 1))
            released += 1
    db.commit()
    return released


def _take_slot(db: Session, project: Project, prompt_id: int) -> bool:
    res = db.execute(
        update(Prompt)
        .where(Prompt.id == prompt_id, Prompt.slots_taken < project.annotators_per_prompt)
        .values(slots_taken=Prompt.slots_taken + 1)
    )
    return res.rowcount == 1


@unit_of_work
def next_task(db: Session, user: User, project: Project, now: float | None = None) -> Task | None:
    """Lease the next prompt for `user`: their own live lease if they have one, else the
    least-annotated prompt that still has a free slot and that they never ranked. None when
    nothing is left for them.

    The search runs in a read-only transaction; only the claim (conditional slot UPDATE +
    assignment INSERT) is a write, so on SQLite the single-writer section stays short."""
    from annotation.db import begin_read_only

    now = time.time() if now is None else now
    require_annotator(user)
    begin_read_only(db)
    # Expired leases are looked for at most every STALE_CHECK_S per project and process
    # (leases last 10 s or more), not on every request.
    key = (str(db.get_bind().url), project.id)
    if not now - STALE_CHECK_S < _last_stale_check.get(key, -1e18) <= now:
        _last_stale_check[key] = now
        stale = db.scalar(
            select(Assignment.id).where(
                Assignment.project_id == project.id, Assignment.status == "leased", Assignment.leased_until < now
            ).limit(1)
        )
        if stale is not None:
            release_expired_leases(db, project, now)  # its own short write transaction
            begin_read_only(db)
    live = db.scalar(
        select(Assignment).where(
            Assignment.user_id == user.id, Assignment.project_id == project.id, Assignment.status == "leased"
        ).order_by(Assignment.id).limit(1)
    )
    if live is not None:
        return _task(db, live, project, db.get(Prompt, live.prompt_id))
    mine = exists().where(
        Assignment.prompt_id == Prompt.id, Assignment.user_id == user.id, Assignment.status != "expired"
    )
    for _attempt in range(5):
        begin_read_only(db)  # a fresh snapshot each attempt
        ids = list(
            db.scalars(
                select(Prompt.id)
                .where(
                    Prompt.project_id == project.id, Prompt.n_candidates >= 2,
                    Prompt.slots_taken < project.annotators_per_prompt, ~mine,
                )
                .order_by(Prompt.done_count, Prompt.slots_taken, Prompt.id)
                .limit(16)
            )
        )
        if not ids:
            return None
        # Spread concurrent annotators over the least-annotated prompts instead of all
        # racing for the first one (they would then retry one by one).
        # Seeded per user so simulated runs (align demo) repeat exactly.
        lowest = ids[: max(1, min(len(ids), 8))]
        random.Random(user.id * 7919 + _attempt).shuffle(lowest)
        cands: dict[int, list[tuple[int, str]]] = {}
        for pid, cid, text in db.execute(select(Candidate.prompt_id, Candidate.id, Candidate.text)
                                         .where(Candidate.prompt_id.in_(lowest)).order_by(Candidate.prompt_id, Candidate.position)):
            cands.setdefault(pid, []).append((cid, text))
        contents = dict(db.execute(select(Prompt.id, Prompt.content).where(Prompt.id.in_(lowest))).all())
        expired = dict(db.execute(select(Assignment.prompt_id, Assignment.id).where(
            Assignment.user_id == user.id, Assignment.prompt_id.in_(lowest))).all())
        db.commit()  # end the snapshot; the claim below is one short write transaction
        for pid in lowest:
            if not _take_slot(db, project, pid):
                continue
            text_of = dict(cands[pid])
            order = list(text_of)
            random.Random(f"{user.id}:{pid}").shuffle(order)  # per-annotator order, reproducible
            until = now + project.lease_seconds
            if pid in expired:  # the user's own expired lease: take it up again
                res = db.execute(
                    update(Assignment).where(Assignment.id == expired[pid], Assignment.status == "expired")
                    .values(status="leased", leased_until=until, candidate_order=order)
                )
                if res.rowcount != 1:
                    break
                aid = expired[pid]
            else:
                a = Assignment(
                    project_id=project.id, prompt_id=pid, user_id=user.id, status="leased", candidate_order=order,
                    leased_until=until, created_at=now, completed_at=None,
                )
                db.add(a)
                try:
                    db.flush()
                except IntegrityError:  # same user, two tabs, same prompt at once
                    break
                aid = a.id
            db.commit()
            return Task(  # prompts and candidates never change once leasable: the snapshot's copy is current
                assignment_id=aid, project=project.name, prompt_id=pid, prompt=contents[pid],
                candidates=[TaskCandidate(cid, text_of[cid]) for cid in order],
                status="leased", leased_until=until, guidelines=project.guidelines,
            )
        db.rollback()
    return None


def _own_assignment(db: Session, user: User, assignment_id: int) -> Assignment:
    if not isinstance(assignment_id, int) or isinstance(assignment_id, bool) or not 1 <= assignment_id <= MAX_DB_INT:
        raise NotFound(f"no task {assignment_id}")
    require_annotator(user)
    a = db.get(Assignment, assignment_id)
    if a is None:
        raise NotFound(f"no task {assignment_id}")
    if a.user_id != user.id:
        raise Forbidden(f"task {assignment_id} belongs to another annotator")
    return a


@read_only
def get_task(db: Session, user: User, assignment_id: int) -> Task:
    a = _own_assignment(db, user, assignment_id)
    return _task(db, a, db.get(Project, a.project_id), db.get(Prompt, a.prompt_id))


def check_text(value: Any, what: str, limit: int) -> str:
    """A string the database can store: at most `limit` characters and no NUL."""
    if not isinstance(value, str):
        raise Invalid(f"{what} must be a string")
    if len(value) > limit:
        raise Invalid(f"{what} is longer than {limit} characters")
    if "\x00" in value:
        raise Invalid(f"{what} contains a NUL character")
    return value


def clean_optional_text(value: Any, what: str, limit: int = MAX_REASON) -> str | None:
    return None if value is None or value == "" else check_text(value, what, limit)


def _clean_bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"{what} must be true or false")
    return value


def _clean_time(time_spent_ms: Any) -> int | None:
    if time_spent_ms is None:
        return None
    if not isinstance(time_spent_ms, int) or isinstance(time_spent_ms, bool) or not 0 <= time_spent_ms <= 7 * 86400 * 1000:
        raise Invalid("time_spent_ms must be a non-negative integer number of milliseconds")
    return time_spent_ms


@unit_of_work
def submit_ranking(
    db: Session,
    user: User,
    assignment_id: int,
    order: Any,
    *,
    all_bad: bool = False,
    rationale: str | None = None,
    time_spent_ms: int | None = None,
    now: float | None = None,
) -> RankingRow:
    """Store the first ranking of a leased task (revision 1). `order` lists groups of
    candidate ids best first; ids in one group are tied. A task already ranked is refused
    (409): corrections go through `revise_ranking`, which appends a revision."""
    from annotation.db import begin_read_only

    now = time.time() if now is None else now
    begin_read_only(db)
    a = _own_assignment(db, user, assignment_id)
    order = validate_order(order, list(a.candidate_order))
    rationale = clean_optional_text(rationale, "rationale")
    time_spent_ms = _clean_time(time_spent_ms)
    all_bad = _clean_bool(all_bad, "all_bad")
    if a.status in ("done", "skipped"):
        raise Conflict(f"task {assignment_id} is already {'ranked' if a.status == 'done' else 'skipped'}; "
                       "send a revision (PUT) to correct a ranking")
    db.commit()  # end the snapshot: the conditional updates below re-check everything they rely on
    if a.status == "expired" or a.leased_until < now:
        project = db.get(Project, a.project_id)
        # The lease ran out: the ranking still counts if a slot is free (or still ours).
        if a.status == "leased":
            res = db.execute(update(Assignment).where(Assignment.id == a.id, Assignment.status == "leased").values(status="expired"))
            if res.rowcount == 1:
                db.execute(update(Prompt).where(Prompt.id == a.prompt_id).values(slots_taken=Prompt.slots_taken - 1))
        if not _take_slot(db, project, a.prompt_id):
            db.rollback()
            raise Conflict(f"the lease on task {assignment_id} expired and the prompt has all its annotators")
        res = db.execute(update(Assignment).where(Assignment.id == a.id, Assignment.status == "expired").values(status="leased"))
        if res.rowcount != 1:
            db.rollback()
            raise Conflict(f"task {assignment_id} changed while submitting; reload it")
    res = db.execute(
        update(Assignment)
        .where(Assignment.id == a.id, Assignment.user_id == user.id, Assignment.status == "leased")
        .values(status="done", completed_at=now)
    )
    if res.rowcount != 1:
        db.rollback()
        raise Conflict(f"task {assignment_id} was submitted already")
    db.execute(update(Prompt).where(Prompt.id == a.prompt_id).values(done_count=Prompt.done_count + 1))
    row = RankingRow(
        project_id=a.project_id, prompt_id=a.prompt_id, user_id=user.id, assignment_id=a.id, revision=1, order=order,
        all_bad=all_bad, skipped=False, skip_reason=None, rationale=rationale, time_spent_ms=time_spent_ms,
        created_at=now,
    )
    db.add(row)
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise Conflict(f"task {assignment_id} was submitted already") from None
    return row


@unit_of_work
def revise_ranking(
    db: Session,
    user: User,
    assignment_id: int,
    order: Any,
    *,
    all_bad: bool = False,
    rationale: str | None = None,
    time_spent_ms: int | None = None,
) -> RankingRow:
    """Correct a ranking: a new row with revision + 1; earlier revisions stay as they were."""
    a = _own_assignment(db, user, assignment_id)
    order = validate_order(order, list(a.candidate_order))
    rationale = clean_optional_text(rationale, "rationale")
    time_spent_ms = _clean_time(time_spent_ms)
    all_bad = _clean_bool(all_bad, "all_bad")
    if a.status != "done":
        raise Conflict(f"task {assignment_id} has no ranking to revise yet (status {a.status}); submit it first (POST)")
    for _ in range(3):
        last = db.scalar(select(func.max(RankingRow.revision)).where(RankingRow.assignment_id == a.id)) or 0
        row = RankingRow(
            project_id=a.project_id, prompt_id=a.prompt_id, user_id=user.id, assignment_id=a.id, revision=last + 1,
            order=order, all_bad=all_bad, skipped=False, skip_reason=None, rationale=rationale,
            time_spent_ms=time_spent_ms, created_at=time.time(),
        )
        db.add(row)
        try:
            db.commit()
            return row
        except IntegrityError:  # two revisions at once: take the next number
            db.rollback()
    raise Conflict(f"task {assignment_id} is being revised concurrently; try again")


@unit_of_work
def skip_task(db: Session, user: User, assignment_id: int, reason: str) -> RankingRow:
    """Skip a leased task with a reason: recorded as a skipped ranking row; the slot goes
    back to the pool for another annotator, and this annotator will not get it again."""
    a = _own_assignment(db, user, assignment_id)
    reason = clean_optional_text(reason, "reason")
    if not reason or not reason.strip():
        raise Invalid("a skip needs a reason")
    if a.status not in ("leased", "expired"):
        raise Conflict(f"task {assignment_id} is already {a.status}")
    was_leased = a.status == "leased"
    res = db.execute(
        update(Assignment).where(Assignment.id == a.id, Assignment.status == a.status).values(status="skipped", completed_at=time.time())
    )
    if res.rowcount != 1:
        db.rollback()
        raise Conflict(f"task {assignment_id} changed while skipping; reload it")
    if was_leased:
        db.execute(update(Prompt).where(Prompt.id == a.prompt_id).values(slots_taken=Prompt.slots_taken - 1))
    row = RankingRow(
        project_id=a.project_id, prompt_id=a.prompt_id, user_id=user.id, assignment_id=a.id, revision=1, order=None,
        all_bad=False, skipped=True, skip_reason=reason.strip(), rationale=None, time_spent_ms=None, created_at=time.time(),
    )
    db.add(row)
    db.commit()
    return row
