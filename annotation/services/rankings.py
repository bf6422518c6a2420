"""Rankings: checking what an annotator sent and storing it (first ranking, revisions, skips)."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from align.text_checks import text_problem
from annotation.limits import MAX_DB_INT, MAX_TIME_SPENT_MS
from annotation.models import Project, RankingRow, User
from annotation.raw_sql import Sql, Transaction, autocommit, insert_into, on_postgresql, transaction
from annotation.services._tx import read_only, unit_of_work
from annotation.services.errors import (
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    Unauthorized,
    another_annotators,
    not_a_member,
)
from annotation.services.leasing import AssignmentRow, Task, expire_lease, read_assignment, take_slot, task_of
from annotation.services.projects import MAX_CANDIDATES
from annotation.services.ranking_history import Revision, latest_revision, repeats
from annotation.services.slots import free_slot
from annotation.services.users import BearerToken, CallerStatement, SessionCookie, as_user, require_annotator, signed_in

MAX_REASON = 2_000


def ranks_to_order(candidate_ids: list[int], ranks: list[int]) -> list[list[int]]:
    """[c1, c2, c3], ranks [1, 0, 1] -> [[c2], [c1, c3]] (tie groups, best first)."""
    groups: dict[int, list[int]] = {}
    for cid, rank in zip(candidate_ids, ranks):
        groups.setdefault(int(rank), []).append(cid)
    return [groups[r] for r in sorted(groups)]


def order_to_ranks(candidate_ids: list[int], order: list[list[int]], below: list[int] | None = None) -> list[int]:
    """Inverse of ranks_to_order with dense ranks: rank = index of the tie group. The ids
    of a top-m ranking's unordered rest (`below`) all get rank m, the number ranked, as
    `align.formats.Ranking` has them."""
    rank_of = {cid: g for g, group in enumerate(order) for cid in group}
    ranked = len(rank_of)
    rank_of.update((cid, ranked) for cid in below or ())
    return [rank_of[cid] for cid in candidate_ids]


def ranked_prefix(order: list[list[int]], below: list[int] | None) -> int | None:
    """m of a stored top-m ranking (how many candidates its order ranks); None for a full one."""
    return sum(len(group) for group in order) if below else None


def _order_groups(order: Any, k: int) -> tuple[list[list[int]], set[int]]:
    """The order's tie groups (a bare id is a group of one) and the ids they hold. Raises
    Invalid if its shape is wrong or an id repeats; linear in the input, and it stops
    reading once more than 2k ids were sent."""
    if not isinstance(order, list) or not order:
        raise Invalid("order must be a non-empty list of groups of candidate ids, best first")
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
    return groups, seen


def validate_order(order: Any, candidate_ids: list[int]) -> list[list[int]]:
    """The order must be a list of non-empty groups of candidate ids that together hold each
    of the task's candidates exactly once. Raises Invalid saying what is wrong. Linear in
    the input, and it stops reading once more ids than the task's K were sent."""
    return validate_ranking(order, None, candidate_ids, None)[0]


def validate_ranking(order: Any, below: Any, candidate_ids: list[int],
                     rank_top: int | None) -> tuple[list[list[int]], list[int] | None]:
    """A full ranking (`below` None or empty: `order` holds every candidate), or, in a
    project that ranks the best `rank_top` (m), a top-m one: `order` ranks at least m of
    the candidates and `below` lists the rest, unordered. Returns (order's groups, below or
    None). Raises Invalid saying what is wrong."""
    if below is not None and not isinstance(below, list):
        raise Invalid("below must be a list of candidate ids (the unranked rest of a top-m ranking)")
    below = below or None
    if below is not None and rank_top is None:
        raise Invalid("this project ranks every candidate; send them all in order (no below)")
    sent = order if below is None or not isinstance(order, list) else [*order, below]
    groups, seen = _order_groups(sent, len(candidate_ids))  # below too: ids that repeat, or are not ints
    if below is not None:
        groups.pop()
        seen.difference_update(below)
        if not groups:
            raise Invalid(f"order must rank at least the best {rank_top} candidates; the rest go below")
    unknown = sorted((seen | set(below or ())) - set(candidate_ids))
    if unknown:
        raise Invalid(f"candidate ids not in this task: {unknown}")
    missing = sorted(set(candidate_ids) - seen - set(below or ()))
    if missing:
        raise Invalid(f"order leaves out candidate ids {missing}; rank every candidate (ties allowed)"
                      if rank_top is None else
                      f"candidate ids {missing} are neither ranked nor below; list the unranked ones in below")
    if below is not None and len(seen) < rank_top:
        raise Invalid(f"rank at least the best {rank_top} candidates (ranked {len(seen)}); the rest go below")
    return groups, below


# From 'leased', or from 'expired' for a lease that ran out (`_complete`).
_COMPLETE = Sql("UPDATE assignments SET status = 'done', completed_at = :now "
                 "WHERE id = :id AND user_id = :user AND status = :status")
_PER_PROMPT = Sql("SELECT annotators_per_prompt FROM projects WHERE id = :project")
_RANK_TOP = Sql("SELECT rank_top FROM projects WHERE id = :project")
_COUNT_DONE = Sql("UPDATE prompts SET done_count = done_count + 1 WHERE id = :prompt")
# The INSERTs into rankings are built from its model (`raw_sql.insert_into`), so that none
# of them can leave out a column the model has. What every first ranking of a task stores:
_FIRST_RANKING = dict(revision="1", all_bad=":all_bad", skipped="false", skip_reason="NULL")
_INSERT_RANKING = Sql("{0.into} VALUES ({0.values}) RETURNING id".format(insert_into(
    RankingRow.__table__, project_id=":project", prompt_id=":prompt", user_id=":user", assignment_id=":assignment",
    order=":order", below=":below", rationale=":rationale", time_spent_ms=":time_spent_ms", created_at=":now",
    **_FIRST_RANKING)), json_params=["order", "below"])


# PostgreSQL: storing a ranking of a live lease in one statement, run in autocommit (atomic
# by itself), instead of a read of the task, BEGIN, three statements and COMMIT. The lease
# is marked done only if it is the caller's (a user by id, or a token's holder: see
# `users.VALID_TOKEN_HOLDER`) and they may annotate (a member of the project, or an
# admin), it is still live, and its candidates are the ids ranked (`ids`, sorted); the
# count and the ranking follow only from that row.
# Parameters that may be NULL carry their type: an untyped one would be taken as text.
_INSERT_DONE = insert_into(
    RankingRow.__table__, project_id="project_id", prompt_id="prompt_id", user_id="user_id", assignment_id="id",
    order="CAST(:order AS json)", below="CAST(:below AS json)", rationale="CAST(:rationale AS text)",
    time_spent_ms="CAST(:time_spent_ms AS integer)", created_at=":now", **_FIRST_RANKING)


def _submit_in_one_statement(caller_sql: str) -> Sql:
    return Sql(f"""
WITH done AS (
  UPDATE assignments SET status = 'done', completed_at = :now
  WHERE id = :id AND user_id = (SELECT id FROM ({caller_sql}) caller WHERE role <> 'source')
    AND status = 'leased' AND leased_until >= :now
    AND (NOT CAST(:members_only AS boolean) OR EXISTS (SELECT 1 FROM project_members m WHERE m.project_id = assignments.project_id
                 AND m.user_id = assignments.user_id)
         OR EXISTS (SELECT 1 FROM users u WHERE u.id = assignments.user_id AND u.role = 'admin'))
    AND (SELECT jsonb_agg(c ORDER BY c) FROM jsonb_array_elements(CAST(candidate_order AS jsonb)) c)
        = CAST(:ids AS jsonb)
  RETURNING id, project_id, prompt_id, user_id),
counted AS (UPDATE prompts SET done_count = done_count + 1 WHERE id IN (SELECT prompt_id FROM done))
{_INSERT_DONE.into}
SELECT {_INSERT_DONE.values} FROM done
RETURNING id, project_id, prompt_id, user_id""", json_params=["order", "ids", "below"])


_SUBMIT_IN_ONE_STATEMENT = CallerStatement(_submit_in_one_statement)


def _store_in_one_statement(db: Session, caller: User | BearerToken, assignment_id: int, order: list[list[int]],
                            below: list[int] | None, ids: set[int], all_bad: bool, rationale: str | None,
                            time_spent_ms: int | None, now: float, members_only: bool) -> RankingRow | None:
    """PostgreSQL: store the first ranking of the caller's live lease `assignment_id`, whose
    candidates must be `ids`, in one statement. None, changing nothing, when it is not so
    (or the caller's token does not authenticate)."""
    with autocommit(db) as tx:
        row = _SUBMIT_IN_ONE_STATEMENT.first(tx, caller, now, id=assignment_id, ids=sorted(ids), order=order,
                                             below=below, all_bad=all_bad, rationale=rationale,
                                             time_spent_ms=time_spent_ms, members_only=members_only)
    if row is None:
        return None
    ranking_id, project_id, prompt_id, user_id = row
    return RankingRow.transient(
        id=ranking_id, project_id=project_id, prompt_id=prompt_id, user_id=user_id, assignment_id=assignment_id,
        revision=1, order=order, below=below, all_bad=all_bad, skipped=False, skip_reason=None, rationale=rationale,
        time_spent_ms=time_spent_ms, created_at=now)


_IS_MEMBER = Sql("SELECT 1 FROM project_members WHERE project_id = :project AND user_id = :user")


def _own_assignment(db: Session, user: User, assignment_id: int, members_only: bool) -> AssignmentRow:
    """The assignment, if it is `user`'s, and with `members_only` (a request's caller), if
    they are a member of its project or an admin. In-process callers (the demo's simulated
    annotators) lease with `next_task` and need no membership, as there."""
    if not isinstance(assignment_id, int) or isinstance(assignment_id, bool) or not 1 <= assignment_id <= MAX_DB_INT:
        raise NotFound(f"no task {assignment_id}")
    require_annotator(user)
    with transaction(db, write=False) as tx:
        a = read_assignment(tx, assignment_id)
    if a is None:
        raise NotFound(f"no task {assignment_id}")
    if a.user_id != user.id:
        raise another_annotators(assignment_id)
    if members_only and user.role != "admin":
        with transaction(db, write=False) as tx:
            member = _IS_MEMBER.first(tx, project=a.project_id, user=user.id) is not None
        if not member:
            raise not_a_member(assignment_id)
    return a


@read_only
def get_task(db: Session, user: User, assignment_id: int, *, members_only: bool = False) -> Task:
    a = _own_assignment(db, user, assignment_id, members_only)
    return task_of(db, a, db.get(Project, a.project_id))


def check_text(value: Any, what: str, limit: int) -> str:
    """A string the database can store: at most `limit` characters, no NUL and no lone
    surrogate (`align.text_checks.text_problem`)."""
    if not isinstance(value, str):
        raise Invalid(f"{what} must be a string")
    if len(value) > limit:
        raise Invalid(f"{what} is longer than {limit} characters")
    problem = text_problem(value)
    if problem:
        raise Invalid(f"{what} {problem}")
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
    if not isinstance(time_spent_ms, int) or isinstance(time_spent_ms, bool) or not 0 <= time_spent_ms <= MAX_TIME_SPENT_MS:
        raise Invalid("time_spent_ms must be a non-negative integer number of milliseconds")
    return time_spent_ms


@unit_of_work
def submit_ranking(
    db: Session,
    caller: User | BearerToken | SessionCookie,
    assignment_id: int,
    order: Any,
    *,
    below: list[int] | None = None,
    all_bad: bool = False,
    rationale: str | None = None,
    time_spent_ms: int | None = None,
    now: float | None = None,
    members_only: bool = False,
) -> RankingRow:
    """Store the first ranking of a leased task (revision 1). `order` lists groups of
    candidate ids best first; ids in one group are tied. In a top-m project `below` may list
    the candidates left unranked under them (see `validate_ranking`). A task already ranked
    is refused (409): corrections go through `revise_ranking`, which appends a revision. The
    caller is a user, an API token or a session cookie (Unauthorized if it does not
    authenticate)."""
    now = time.time() if now is None else now
    presented, caller = caller, signed_in(db, caller)
    if on_postgresql(db) and not below:  # (a top-m ranking needs the project's m: the careful path reads it)
        stored = _store_at_first_try(db, caller, assignment_id, order, all_bad, rationale, time_spent_ms, now,
                                     members_only)
        if stored is not None:
            return stored
    user = as_user(db, caller)
    a = _own_assignment(db, user, assignment_id, members_only)
    order, below = _checked_ranking(db, a, order, below)
    rationale = clean_optional_text(rationale, "rationale")
    time_spent_ms = _clean_time(time_spent_ms)
    all_bad = _clean_bool(all_bad, "all_bad")
    if a.status == "skipped":
        raise _skipped(assignment_id)
    if a.status == "done":
        raise Conflict(f"task {assignment_id} is already ranked; send a revision (PUT) to correct it",
                       code="already_ranked")
    # The conditional updates below re-check everything they rely on from the read above.
    tried_in_one_statement = False
    try:
        if a.live(now) and on_postgresql(db):
            stored = _store_in_one_statement(db, user, a.id, order, below, set(a.candidate_order), all_bad,
                                             rationale, time_spent_ms, now, members_only)
            if stored is not None:
                return stored
            tried_in_one_statement = True
        with transaction(db, write=True) as tx:
            if not a.live(now):
                # A lease that ran out: deactivating or removing its annotator expires it too, so
                # the completion would match; whether they may still rank it is read now
                a = _task_now(tx, a, members_only)
            if tried_in_one_statement or not _complete(tx, a, user.id, now):
                # Nothing was stored: the task changed since it was read (ranked or skipped in
                # another tab, its lease expired by another request's sweep, its annotator
                # removed from the project or deactivated). What it is now decides the answer.
                a = _task_now(tx, a, members_only)
                if not _complete(tx, a, user.id, now):  # (PostgreSQL: changed again since)
                    raise Conflict(f"task {assignment_id} changed while it was being submitted; reload it")
            _COUNT_DONE.rowcount(tx, prompt=a.prompt_id)
            ranking_id = _INSERT_RANKING.scalar(
                tx, project=a.project_id, prompt=a.prompt_id, user=user.id, assignment=a.id, order=order,
                below=below, all_bad=all_bad, rationale=rationale, time_spent_ms=time_spent_ms, now=now)
    except IntegrityError:  # a ranking of the task is stored already
        raise Conflict(f"task {assignment_id} was submitted already", code="already_ranked") from None
    except _Deactivated:
        raise _refused_as_deactivated(db, presented, user) from None
    return RankingRow.transient(
        id=ranking_id, project_id=a.project_id, prompt_id=a.prompt_id, user_id=user.id, assignment_id=a.id,
        revision=1, order=order, below=below, all_bad=all_bad, skipped=False, skip_reason=None, rationale=rationale,
        time_spent_ms=time_spent_ms, created_at=now)


def _skipped(assignment_id: int) -> Conflict:
    """A skip is final for the annotator who skipped: its slot went back to the pool (another
    annotator may hold it now) and the prompt is never offered to them again, so neither a
    first ranking nor a revision may follow it."""
    return Conflict(f"task {assignment_id} was skipped, and a skipped task cannot be ranked", code="already_skipped")


def _store_at_first_try(db: Session, caller: User | BearerToken, assignment_id: Any, order: Any, all_bad: Any,
                        rationale: Any, time_spent_ms: Any, now: float, members_only: bool) -> RankingRow | None:
    """PostgreSQL, the usual submission (well-formed, the annotator's live lease): stored
    with no read of the task before it. None, changing nothing, for anything else; the
    careful path then reads the task and says what is wrong, in its own order of checks."""
    try:
        if isinstance(caller, User):  # a token's holder is checked in the statement
            require_annotator(caller)
        if not isinstance(assignment_id, int) or isinstance(assignment_id, bool) or not 1 <= assignment_id <= MAX_DB_INT:
            return None
        groups, ids = _order_groups(order, MAX_CANDIDATES)
        rationale = clean_optional_text(rationale, "rationale")
        time_spent_ms = _clean_time(time_spent_ms)
        all_bad = _clean_bool(all_bad, "all_bad")
    except (Forbidden, Invalid):
        return None
    try:
        return _store_in_one_statement(db, caller, assignment_id, groups, None, ids, all_bad, rationale,
                                       time_spent_ms, now, members_only)
    except IntegrityError:  # a ranking of this task is stored already: the careful path says so
        return None


def _checked_ranking(db: Session, a: AssignmentRow, order: Any,
                     below: Any) -> tuple[list[list[int]], list[int] | None]:
    """`validate_ranking` for the task `a`; the project's m is read only for a top-m ranking."""
    rank_top = None
    if below:
        with transaction(db, write=False) as tx:
            rank_top = _RANK_TOP.scalar(tx, project=a.project_id)
    return validate_ranking(order, below, list(a.candidate_order), rank_top)


def _complete(tx: Transaction, a: AssignmentRow, user_id: int, now: float) -> bool:
    """Mark the task done if it still is what `a` read: a live lease, or one that ran out,
    whose ranking still counts if a slot is free (lease_expired if none is). False when it
    is neither any more, having changed nothing but, maybe, marking a lease that ran out
    expired (its slot given back), as a sweep would."""
    live = a.live(now)
    if a.status == "leased" and not live:
        expire_lease(tx, a.id, a.prompt_id)
    # The lease that ran out stays 'expired' until this marks it done: made 'leased' again
    # it would be a second live lease where the annotator has leased another prompt since
    # (ux_assignments_live).
    if _COMPLETE.rowcount(tx, now=now, id=a.id, user=user_id, status="leased" if live else "expired") != 1:
        return False
    if not live and not take_slot(tx, a.prompt_id, _PER_PROMPT.scalar(tx, project=a.project_id)):
        raise Conflict(f"the lease on task {a.id} expired and the prompt has all its annotators", code="lease_expired")
    return True


# A task as it is now, with what decides whether its annotator may still rank it.
_TASK_NOW = Sql("SELECT a.status, a.leased_until, u.active, u.role, "
                "EXISTS (SELECT 1 FROM project_members m WHERE m.project_id = a.project_id AND m.user_id = a.user_id), "
                "EXISTS (SELECT 1 FROM rankings r WHERE r.assignment_id = a.id AND NOT r.skipped) "
                "FROM assignments a JOIN users u ON u.id = a.user_id WHERE a.id = :id")


class _Deactivated(Exception):
    """The annotator was deactivated while their ranking was being stored."""


def _task_now(tx: Transaction, a: AssignmentRow, members_only: bool) -> AssignmentRow:
    """The task `a` re-read where its completion changed nothing, when it may still be
    completed (a lease, live or run out: a late ranking counts if a slot is free); else
    raises what a request sent now would be answered, in the order its checks come."""
    status, leased_until, active, role, member, ranked = _TASK_NOW.first(tx, id=a.id)
    if not active:
        raise _Deactivated
    if members_only and role != "admin" and not member:
        raise not_a_member(a.id)
    if status == "done" or ranked:
        raise Conflict(f"task {a.id} was submitted already", code="already_ranked")
    if status == "skipped":
        raise _skipped(a.id)
    return a._replace(status=status, leased_until=leased_until)


def _refused_as_deactivated(db: Session, presented: User | BearerToken | SessionCookie, user: User) -> Exception:
    """What any request of the deactivated account is answered: its token or session no
    longer signs it in (deactivating revoked them: 401), and a user by id is refused as
    `require_annotator` refuses it (403)."""
    if not isinstance(presented, User):
        try:
            as_user(db, signed_in(db, presented))
        except Unauthorized as refused:
            return refused
    return Forbidden("this account is deactivated")


@unit_of_work
def revise_ranking(
    db: Session,
    user: User,
    assignment_id: int,
    order: Any,
    *,
    below: list[int] | None = None,
    all_bad: bool = False,
    rationale: str | None = None,
    time_spent_ms: int | None = None,
    members_only: bool = False,
) -> Revision:
    """Correct a ranking: a new row with revision + 1; earlier revisions stay as they were. The
    same ranking as the latest (a request sent again) stores nothing: Revision(latest, stored=False)."""
    a = _own_assignment(db, user, assignment_id, members_only)
    order, below = _checked_ranking(db, a, order, below)
    rationale = clean_optional_text(rationale, "rationale")
    time_spent_ms = _clean_time(time_spent_ms)
    all_bad = _clean_bool(all_bad, "all_bad")
    if a.status == "skipped":
        raise _skipped(assignment_id)
    if a.status != "done":
        raise Conflict(f"task {assignment_id} has no ranking to revise yet (status {a.status}); submit it first (POST)")
    for _ in range(3):  # read again after a concurrent revision: it may be this one, sent twice at once
        latest = latest_revision(db, a.id)
        if repeats(latest, order, below, all_bad, rationale):
            return Revision(latest, stored=False)
        row = RankingRow(
            project_id=a.project_id, prompt_id=a.prompt_id, user_id=user.id, assignment_id=a.id,
            revision=(latest.revision if latest else 0) + 1,
            order=order, below=below, all_bad=all_bad, skipped=False, skip_reason=None, rationale=rationale,
            time_spent_ms=time_spent_ms, created_at=time.time(),
        )
        db.add(row)
        try:
            db.commit()
            return Revision(row, stored=True)
        except IntegrityError:  # two revisions at once: take the next number
            db.rollback()
    raise Conflict(f"task {assignment_id} is being revised concurrently; try again")


_SKIP = Sql("UPDATE assignments SET status = 'skipped', completed_at = :now WHERE id = :id AND status = :status")
# A skip's order is JSON null, as the ORM writes None to the NOT NULL column.
_INSERT_SKIP = Sql("{0.into} VALUES ({0.values}) RETURNING id".format(insert_into(
    RankingRow.__table__, project_id=":project", prompt_id=":prompt", user_id=":user", assignment_id=":assignment",
    revision="1", order="'null'", below="NULL", all_bad="false", skipped="true", skip_reason=":reason",
    rationale="NULL", time_spent_ms="NULL", created_at=":now")))


@unit_of_work
def skip_task(db: Session, user: User, assignment_id: int, reason: str, *, members_only: bool = False) -> RankingRow:
    """Skip a leased task with a reason: recorded as a skipped ranking row; the slot goes
    back to the pool for another annotator, and this annotator will not get it again."""
    a = _own_assignment(db, user, assignment_id, members_only)
    reason = clean_optional_text(reason, "reason")
    if not reason or not reason.strip():
        raise Invalid("a skip needs a reason")
    if a.status not in ("leased", "expired"):
        what = "ranked" if a.status == "done" else "skipped"
        raise Conflict(f"task {assignment_id} is already {what}", code=f"already_{what}")
    now = time.time()
    try:
        with transaction(db, write=True) as tx:
            if _SKIP.rowcount(tx, id=a.id, status=a.status, now=now) != 1:
                _task_now(tx, a, members_only)  # ranked or skipped meanwhile: said with its code
                raise Conflict(f"task {assignment_id} changed while skipping; reload it")
            if a.status == "leased":  # an expired lease's slot went back when it expired
                free_slot(tx, a.prompt_id)
            ranking_id = _INSERT_SKIP.scalar(tx, project=a.project_id, prompt=a.prompt_id, user=user.id,
                                             assignment=a.id, reason=reason.strip(), now=now)
    except _Deactivated:
        raise _refused_as_deactivated(db, user, user) from None
    return RankingRow.transient(
        id=ranking_id, project_id=a.project_id, prompt_id=a.prompt_id, user_id=user.id, assignment_id=a.id, revision=1,
        order=None, below=None, all_bad=False, skipped=True, skip_reason=reason.strip(), rationale=None,
        time_spent_ms=None, created_at=now)
