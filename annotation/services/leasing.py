"""Task leasing: which prompt an annotator ranks next, and the slots that keep a prompt
from getting more annotators than the project asks for.

Every ranking starts with `next_task`, so it is hand-written SQL (`annotation.raw_sql`).
On PostgreSQL a next-task request is one statement: the caller's token, the project, their
live lease, the head of the queue and the claim of one of its prompts, locked with SKIP
LOCKED. On SQLite, and on PostgreSQL when that statement could not lease (every head
prompt was being written), it is one read of the live lease and the queue that takes no
lock, then one short write that claims a slot and records the lease; on SQLite that write
is the only time the request holds the database's single writer lock.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from annotation.db import DatabaseBusy
from annotation.models import Assignment, Project, Prompt, RankingRow, User
from annotation.raw_sql import Insert, Sql, Transaction, autocommit, insert_into, on_postgresql, transaction
from annotation.services._tx import read_only, unit_of_work
from annotation.services.errors import Conflict, NotFound, Unauthorized, another_annotators, not_a_member
from annotation.services.projects import VISIBLE_PROJECT_COLUMNS, VisibleProjectRow, project_for, visible_project
from annotation.services.slots import expire_lease
from annotation.services.users import (
    INVALID_TOKEN,
    BearerToken,
    CallerStatement,
    SessionCookie,
    as_user,
    require_annotator,
    signed_in,
)

STALE_CHECK_S = 2.0
_last_stale_check: dict[tuple[str, str], float] = {}  # (database, project name) -> when
QUEUE_WINDOW = 16  # prompts read from the head of the queue per attempt
SPREAD = 8  # concurrent annotators are spread over this many of the least-annotated prompts


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
    below: list[int] | None = None  # latest stored unordered rest, if it was a top-m ranking
    rank_top: int | None = None  # the project ranks only the best m (None: every candidate)
    all_bad: bool = False  # the latest stored ranking's flag and rationale, so a revision starts from them
    rationale: str | None = None


class AssignmentRow(NamedTuple):
    id: int
    user_id: int
    project_id: int
    prompt_id: int
    status: str
    candidate_order: list[int]
    leased_until: float

    def live(self, now: float) -> bool:
        return self.status == "leased" and self.leased_until >= now


_ASSIGNMENT = Sql("SELECT id, user_id, project_id, prompt_id, status, candidate_order, leased_until "
                  "FROM assignments WHERE id = :id", json_columns=[5])


def read_assignment(tx: Transaction, assignment_id: int) -> AssignmentRow | None:
    row = _ASSIGNMENT.first(tx, id=assignment_id)
    return None if row is None else AssignmentRow(*row)


@read_only
def task_of(db: Session, a: AssignmentRow, project: Project) -> Task:
    """The Task view of an existing assignment, with its latest stored ranking. Read in a
    snapshot: on SQLite an ORM transaction would otherwise take the writer lock."""
    prompt = db.get(Prompt, a.prompt_id)
    by_id = {c.id: c for c in prompt.candidates}
    latest = db.scalar(
        select(RankingRow).where(RankingRow.assignment_id == a.id).order_by(RankingRow.revision.desc()).limit(1)
    )
    return Task(
        assignment_id=a.id, project=project.name, prompt_id=prompt.id, prompt=prompt.content,
        candidates=[TaskCandidate(cid, by_id[cid].text) for cid in a.candidate_order if cid in by_id],
        status=a.status, leased_until=a.leased_until, guidelines=project.guidelines,
        revision=latest.revision if latest else 0, order=latest.order if latest and not latest.skipped else None,
        below=latest.below if latest and not latest.skipped else None, rank_top=project.rank_top,
        all_bad=bool(latest and not latest.skipped and latest.all_bad),
        rationale=latest.rationale if latest and not latest.skipped else None,
    )


_LIVE_LEASE_SQL = ("SELECT id FROM assignments WHERE user_id = :user AND project_id = :project "
                   "AND status = 'leased' ORDER BY id LIMIT 1")
# The least-annotated prompts with a free slot that this annotator has not ranked, skipped
# or holds (an expired lease of theirs may be taken up again): an ordered scan of
# ix_prompts_queue that stops after a few rows. The unary + keeps slots_taken a filter:
# with statistics (ANALYZE) SQLite would otherwise skip-scan the index on it and sort the
# whole project, 2.6 ms instead of 0.03 ms at 3,000 prompts.
def _queue_sql(project: str = ":project", per_prompt: str = ":per_prompt", user: str = ":user",
               limit: int = QUEUE_WINDOW) -> str:
    return f"""
SELECT p.id, p.done_count, p.slots_taken FROM prompts p
WHERE p.project_id = {project} AND p.n_candidates >= 2 AND +p.slots_taken < {per_prompt}
  AND NOT EXISTS (SELECT 1 FROM assignments a
                  WHERE a.prompt_id = p.id AND a.user_id = {user} AND a.status != 'expired')
ORDER BY p.done_count, p.slots_taken, p.id
LIMIT {limit}"""


_LIVE_LEASE = Sql(_LIVE_LEASE_SQL)


_QUEUE_SQL = _queue_sql()
_QUEUE = Sql(_QUEUE_SQL)
# A next-task request on SQLite (and on PostgreSQL when the statement below could not
# lease) starts with both reads, so they are one statement: the annotator's live lease
# (kind 0), if any, then the head of the queue (kind 1).
_LIVE_LEASE_AND_QUEUE = Sql(f"""
SELECT 0 AS kind, id, 0 AS done_count, 0 AS slots_taken FROM ({_LIVE_LEASE_SQL}) live
UNION ALL
SELECT 1, id, done_count, slots_taken FROM ({_QUEUE_SQL}) queue
ORDER BY kind, done_count, slots_taken, id""")


def _insert_lease(**values: str) -> Insert:
    """An INSERT of a new lease into assignments, built from its model (`raw_sql.insert_into`)."""
    return insert_into(Assignment.__table__, status="'leased'", created_at=":now", completed_at="NULL", **values)


# PostgreSQL: a whole next-task request in one statement, run in autocommit: a round trip
# instead of two to five. It reads the caller (a user by id, or a token's holder: no row
# comes back for a token that does not authenticate), the project as they may see it and
# their live lease; only where they may annotate and hold no live lease does it claim a
# prompt. Of the SPREAD least-annotated prompts at the head of their queue it takes the
# first, in an order of their own (`spread_order`), that nobody is writing at that moment:
# SKIP LOCKED passes over a prompt another annotator is claiming or submitting instead of
# waiting for them, and FOR UPDATE re-checks the free slot on the newest version of the
# row. The lease and the slot follow as in `_CLAIM_IN_ONE_STATEMENT`. What comes back:
# the caller, the project (VISIBLE_PROJECT_COLUMNS), the live lease's id, how many prompts
# the head held, and the new lease with its prompt and candidates.
_INSERT_PICKED = _insert_lease(
    project_id="can.id", prompt_id="pick.id", user_id="can.user_id", leased_until=":now + can.lease_seconds",
    candidate_order="(SELECT json_agg(c.id ORDER BY md5(can.user_id || ':' || pick.id || ':' || c.id), c.id) "
                    "FROM candidates c WHERE c.prompt_id = pick.id)")


def _next_task_in_one_statement(caller_sql: str) -> Sql:
    queue_head = _queue_sql("can.id", "can.annotators_per_prompt", "can.user_id", limit=SPREAD)
    return Sql(f"""
WITH caller AS ({caller_sql}),
proj AS (SELECT {VISIBLE_PROJECT_COLUMNS}
         FROM caller JOIN projects proj ON proj.name = :name
         LEFT JOIN project_members m ON m.project_id = proj.id AND m.user_id = caller.id),
can AS (SELECT proj.id, proj.annotators_per_prompt, proj.lease_seconds, caller.id AS user_id FROM caller, proj
        WHERE caller.role <> 'source' AND (proj.member IS NOT NULL OR caller.role = 'admin')),
live AS (SELECT a.id FROM can JOIN assignments a
         ON a.user_id = can.user_id AND a.project_id = can.id AND a.status = 'leased' ORDER BY a.id LIMIT 1),
head AS (SELECT q.id FROM can, LATERAL ({queue_head}) q),
pick AS (SELECT p.id FROM prompts p, can
         WHERE p.id IN (SELECT id FROM head) AND NOT EXISTS (SELECT 1 FROM live)
           AND p.slots_taken < can.annotators_per_prompt
         ORDER BY md5(can.user_id || ':0:' || p.id), p.id
         LIMIT 1 FOR UPDATE OF p SKIP LOCKED),
lease AS (
  {_INSERT_PICKED.into}
  SELECT {_INSERT_PICKED.values} FROM pick, can
  ON CONFLICT (prompt_id, user_id) DO UPDATE
    SET status = 'leased', leased_until = excluded.leased_until, candidate_order = excluded.candidate_order
    WHERE assignments.status = 'expired'
  RETURNING id, prompt_id, candidate_order, leased_until),
taken AS (UPDATE prompts SET slots_taken = slots_taken + 1 WHERE id IN (SELECT prompt_id FROM lease))
SELECT caller.id, caller.username, caller.role, proj.*, (SELECT id FROM live), (SELECT count(*) FROM head),
       lease.id, lease.prompt_id, lease.candidate_order, lease.leased_until, p.content,
       (SELECT json_agg(json_build_array(c.id, c.text)) FROM candidates c WHERE c.prompt_id = p.id),
       set_config('synchronous_commit', 'off', true) AS not_waiting_for_disk
FROM caller LEFT JOIN proj ON true LEFT JOIN lease ON true LEFT JOIN prompts p ON p.id = lease.prompt_id""")


_NEXT_TASK_IN_ONE_STATEMENT = CallerStatement(_next_task_in_one_statement)
_TAKE_SLOT = Sql("UPDATE prompts SET slots_taken = slots_taken + 1 WHERE id = :prompt AND slots_taken < :per_prompt")
_EXPIRED_LEASES = Sql("SELECT id, prompt_id FROM assignments WHERE project_id = :project AND status = 'leased' "
                      "AND leased_until < :now LIMIT 200")
_CONTENT = Sql("SELECT p.content, c.id, c.text FROM prompts p JOIN candidates c ON c.prompt_id = p.id "
               "WHERE p.id = :prompt ORDER BY c.position", json_columns=[0])
# A new lease, or the annotator's own expired lease of this prompt taken up again. Nothing
# comes back when they hold it live already (the same annotator in two tabs at once).
_LEASE = Sql("""
{0.into} VALUES ({0.values})
ON CONFLICT (prompt_id, user_id) DO UPDATE
  SET status = 'leased', leased_until = excluded.leased_until, candidate_order = excluded.candidate_order
  WHERE assignments.status = 'expired'
RETURNING id""".format(_insert_lease(project_id=":project", prompt_id=":prompt", user_id=":user",
                                      candidate_order=":order", leased_until=":until")), json_params=["order"])


# PostgreSQL: the claim in one statement, run in autocommit (atomic by itself), instead of
# BEGIN, a read of the prompt, slot UPDATE, lease INSERT and COMMIT: four round trips
# fewer per ranking. The prompt row is locked first (FOR UPDATE re-checks the free slot on
# its newest version), the lease is inserted only if the slot was free, with the
# candidates in this annotator's order (`lease_order`, written in SQL), and the slot is
# taken only if the lease went in; `free` tells "no slot" from "the annotator holds this
# prompt already", and the prompt and its candidates come back only with a lease. The
# set_config makes this one commit not wait for the disk (transaction-local, as SET LOCAL;
# see `raw_sql.transaction` on why a lease may commit that way).
_INSERT_FREE = _insert_lease(
    project_id=":project", prompt_id="id", user_id=":user", leased_until=":until",
    candidate_order="(SELECT json_agg(c.id ORDER BY md5(CAST(:order_key AS text) || c.id), c.id) "
                    "FROM candidates c WHERE c.prompt_id = slot.id)")
_CLAIM_IN_ONE_STATEMENT = Sql(f"""
WITH slot AS (SELECT id FROM prompts WHERE id = :prompt AND slots_taken < :per_prompt FOR UPDATE),
lease AS (
  {_INSERT_FREE.into}
  SELECT {_INSERT_FREE.values} FROM slot
  ON CONFLICT (prompt_id, user_id) DO UPDATE
    SET status = 'leased', leased_until = excluded.leased_until, candidate_order = excluded.candidate_order
    WHERE assignments.status = 'expired'
  RETURNING id, prompt_id, candidate_order),
taken AS (UPDATE prompts SET slots_taken = slots_taken + 1 WHERE id IN (SELECT prompt_id FROM lease))
SELECT lease.id AS lease, EXISTS (SELECT 1 FROM slot) AS free, lease.candidate_order, p.content,
       (SELECT json_agg(json_build_array(c.id, c.text)) FROM candidates c WHERE c.prompt_id = p.id) AS candidates,
       set_config('synchronous_commit', 'off', true) AS not_waiting_for_disk
FROM (SELECT 1) one LEFT JOIN lease ON true LEFT JOIN prompts p ON p.id = lease.prompt_id""")


def take_slot(tx: Transaction, prompt_id: int, annotators_per_prompt: int) -> bool:
    """Claim one of the prompt's annotator slots; False when they are all taken. The
    conditional UPDATE is what keeps two annotators from taking the last slot at once."""
    return _TAKE_SLOT.rowcount(tx, prompt=prompt_id, per_prompt=annotators_per_prompt) == 1


def release_expired_leases(db: Session, project: Project, now: float | None = None) -> int:
    """Give back the slots of leases that ran out (commits); how many there were."""
    now = time.time() if now is None else now
    with transaction(db, write=True) as tx:
        return sum(expire_lease(tx, aid, pid) for aid, pid in _EXPIRED_LEASES.all(tx, project=project.id, now=now))


class LeasedElsewhere(Exception):
    """The annotator leased a prompt of this project from another tab a moment ago: the
    one this claim reached, or another (the unique index ux_assignments_live refused a
    second live lease)."""


_STALE_LEASES = Sql("SELECT proj.id, EXISTS (SELECT 1 FROM assignments a WHERE a.project_id = proj.id "
                    "AND a.status = 'leased' AND a.leased_until < :now) FROM projects proj WHERE proj.name = :name")


def _release_stale_leases(db: Session, project_name: str, now: float) -> None:
    """Give back the slots of leases that ran out in the project, looked for at most every
    STALE_CHECK_S per project and process (leases last 10 s or more), not on every
    request: a read, and a write only if there are some. Only a project that exists is
    recorded, so requests naming others add nothing."""
    key = (str(db.get_bind().url), project_name)
    if now - STALE_CHECK_S < _last_stale_check.get(key, -1e18) <= now:
        return
    with transaction(db, write=False) as tx:
        row = _STALE_LEASES.first(tx, name=project_name, now=now)
    if row is None:
        return
    _last_stale_check[key] = now
    project_id, any_stale = row
    if any_stale:
        release_expired_leases(db, Project.transient(id=project_id), now)  # its own short write transaction


def spread_order(user_id: int, attempt: int, prompt_ids: list[int]) -> list[int]:
    """The order an annotator tries the least-annotated prompts in, so that concurrent
    annotators spread over them instead of all racing for the first one (they would then
    retry one by one): a sort by md5("user:attempt:prompt"), which PostgreSQL's next-task
    statement computes in SQL for attempt 0. Reproducible, so simulated runs (align demo)
    repeat exactly."""
    return sorted(prompt_ids, key=lambda pid: (hashlib.md5(f"{user_id}:{attempt}:{pid}".encode()).hexdigest(), pid))


def lease_order(user_id: int, prompt_id: int, candidate_ids: list[int]) -> list[int]:
    """The order this annotator sees the candidates in: shuffled, reproducibly per annotator
    and prompt, so that the position a candidate is shown in does not favour it. Sorted by
    md5("user:prompt:candidate"), which PostgreSQL's claim computes in SQL too."""
    key = f"{user_id}:{prompt_id}:"
    return sorted(candidate_ids, key=lambda cid: (hashlib.md5(f"{key}{cid}".encode()).hexdigest(), cid))


def _leased_task(project: Project, prompt_id: int, content: Any, text_of: dict[int, str], assignment_id: int,
                 order: list[int], until: float) -> Task:
    return Task(
        assignment_id=assignment_id, project=project.name, prompt_id=prompt_id, prompt=content,
        candidates=[TaskCandidate(cid, text_of[cid]) for cid in order],
        status="leased", leased_until=until, guidelines=project.guidelines, rank_top=project.rank_top,
    )


def _claim(tx: Transaction, user: User, project: Project, prompt_ids: list[int], now: float) -> Task | None:
    """Lease the first of `prompt_ids` that still has a free slot; None if none has."""
    until = now + project.lease_seconds
    for pid in prompt_ids:
        if not take_slot(tx, pid, project.annotators_per_prompt):
            continue
        rows = _CONTENT.all(tx, prompt=pid)  # never changes once leasable
        order = lease_order(user.id, pid, [cid for _content, cid, _text in rows])
        try:
            aid = _LEASE.scalar(tx, project=project.id, prompt=pid, user=user.id, order=order, until=until, now=now)
        except IntegrityError:  # a live lease of another prompt, taken since the queue was read
            raise LeasedElsewhere from None
        if aid is None:
            raise LeasedElsewhere  # rolls back the slot taken above
        return _leased_task(project, pid, rows[0][0], {cid: text for _content, cid, text in rows}, aid, order, until)
    return None


def _claim_in_one_statement(db: Session, user: User, project: Project, prompt_ids: list[int],
                            now: float) -> Task | None:
    """`_claim` on PostgreSQL: one statement per prompt tried."""
    until = now + project.lease_seconds
    with autocommit(db) as tx:
        for pid in prompt_ids:
            try:
                aid, free, order, content, candidates, _synchronous_commit = _CLAIM_IN_ONE_STATEMENT.first(
                    tx, project=project.id, prompt=pid, user=user.id, per_prompt=project.annotators_per_prompt,
                    order_key=f"{user.id}:{pid}:", until=until, now=now)
            except IntegrityError:  # a live lease of another prompt (ux_assignments_live)
                raise LeasedElsewhere from None
            if aid is not None:
                return _leased_task(project, pid, content, dict(candidates), aid, order, until)
            if free:
                raise LeasedElsewhere
    return None


def claim_first_free(db: Session, user: User, project: Project, prompt_ids: list[int], now: float) -> Task | None:
    """Lease the first of `prompt_ids` that still has a free slot (None if none has), in one
    atomic step. Raises LeasedElsewhere, changing nothing, if the annotator holds the
    prompt it reaches already, or a live lease of another prompt in the project (the same
    annotator in two tabs at once)."""
    if on_postgresql(db):
        return _claim_in_one_statement(db, user, project, prompt_ids, now)
    with transaction(db, write=True, durable=False) as tx:
        return _claim(tx, user, project, prompt_ids, now)


@unit_of_work
def next_task(db: Session, user: User, project: Project, now: float | None = None) -> Task | None:
    """Lease the next prompt for `user`: their own live lease if they have one, else the
    least-annotated prompt that still has a free slot and that they never ranked. None when
    nothing is left for them.

    The queue is read in a snapshot that takes no lock; only the claim (conditional slot
    UPDATE + lease INSERT) is a write, so on SQLite the single-writer section stays short."""
    now = time.time() if now is None else now
    _release_stale_leases(db, project.name, now)
    return _next_task(db, user, project, now)


@unit_of_work
def next_task_in(db: Session, caller: User | BearerToken | SessionCookie, project_name: str,
                 now: float | None = None) -> Task | None:
    """`next_task` in the project named `project_name`, as the caller may see it (NotFound
    if they may not): what a next-task request runs. The caller is a user, an API token or
    a session cookie (Unauthorized if it does not authenticate). On PostgreSQL it is one
    statement."""
    now = time.time() if now is None else now
    caller = signed_in(db, caller)
    _release_stale_leases(db, project_name, now)
    if on_postgresql(db):
        return _next_task_in_one_round_trip(db, caller, project_name, now)
    user = as_user(db, caller)
    return _next_task(db, user, project_for(db, user, project_name), now)


def _next_task_in_one_round_trip(db: Session, caller: User | BearerToken, project_name: str, now: float) -> Task | None:
    """PostgreSQL: `next_task_in` by `_next_task_in_one_statement`, and by `_next_task`
    when it has to (the live lease to show again, or a head of the queue that was all
    being written)."""
    if isinstance(caller, User):
        require_annotator(caller)  # (a user by id is not checked for being active by the statement)
    try:
        with autocommit(db) as tx:
            row = _NEXT_TASK_IN_ONE_STATEMENT.first(tx, caller, now, name=project_name)
    except IntegrityError:  # another tab of the caller leased at the same moment: show theirs
        user = as_user(db, caller)
        return _next_task(db, user, project_for(db, user, project_name), now)
    if row is None:
        raise Unauthorized(INVALID_TOKEN)  # (a User always has a row: a user by id)
    user = caller if isinstance(caller, User) else User.transient(id=row[0], username=row[1], role=row[2], active=True)
    end = 3 + len(VisibleProjectRow._fields)  # the statement's columns: caller, project, the rest
    project = visible_project(user, project_name, row[3:end] if row[3] is not None else None)
    require_annotator(user)
    live, queued, lease, prompt_id, order, until, content, candidates, _synchronous_commit = row[end:]
    if lease is not None:
        return _leased_task(project, prompt_id, content, dict(candidates), lease, order, until)
    if live is None and queued == 0:
        return None
    return _next_task(db, user, project, now, first_attempt=0 if live is not None else 1)


def _live_task(db: Session, user: User, project: Project) -> Task | None:
    """The annotator's live lease in the project, read afresh, as a Task; None if none."""
    with transaction(db, write=False) as tx:
        live_id = _LIVE_LEASE.scalar(tx, user=user.id, project=project.id)
        a = None if live_id is None else read_assignment(tx, live_id)
    return None if a is None else task_of(db, a, project)


def _next_task(db: Session, user: User, project: Project, now: float, first_attempt: int = 0) -> Task | None:
    """`next_task`, once expired leases were looked for. `first_attempt` numbers the first
    of its tries at a claim (see `spread_order`)."""
    require_annotator(user)
    queue = {"project": project.id, "per_prompt": project.annotators_per_prompt, "user": user.id}
    with transaction(db, write=False) as tx:
        rows = _LIVE_LEASE_AND_QUEUE.all(tx, **queue)
        a = read_assignment(tx, rows[0][1]) if rows and rows[0][0] == 0 else None
        ids = [pid for kind, pid, _done, _taken in rows if kind == 1]
    if a is not None:
        return task_of(db, a, project)
    for attempt in range(first_attempt, first_attempt + 5):
        if attempt > first_attempt:
            with transaction(db, write=False) as tx:  # a fresh snapshot
                ids = [pid for pid, _done, _taken in _QUEUE.all(tx, **queue)]
        if not ids:
            return None
        try:
            task = claim_first_free(db, user, project, spread_order(user.id, attempt, ids[:SPREAD]), now)
        except LeasedElsewhere:
            # Another tab of this annotator leased since the snapshot above: that lease is
            # the one to show, not a second one (which ux_assignments_live would refuse).
            live = _live_task(db, user, project)
            if live is not None:
                return live
            continue
        if task is not None:
            return task
    # Prompts were left at every try, and others took each one first: the queue is
    # contended, not empty. "Nothing left" would tell the annotator they are done; busy
    # (503, Retry-After) has them ask again in a moment.
    raise DatabaseBusy("every task offered was taken by another annotator first; try again in a moment")


# The caller's own live lease, held for the project's lease_seconds from now: one UPDATE.
# A lease that ran out is not revived (its slot may be another annotator's already; a late
# submission still counts if one is free), nor one of a project the caller left.
_RENEW = Sql("""
UPDATE assignments SET leased_until = :now + (SELECT lease_seconds FROM projects WHERE id = assignments.project_id)
WHERE id = :id AND user_id = :user AND status = 'leased' AND leased_until >= :now
  AND (NOT CAST(:members_only AS boolean) OR EXISTS (SELECT 1 FROM project_members m
       WHERE m.project_id = assignments.project_id AND m.user_id = assignments.user_id))
RETURNING leased_until""")
_RENEW_REFUSED = Sql("SELECT a.user_id, a.status, EXISTS (SELECT 1 FROM project_members m WHERE "
                     "m.project_id = a.project_id AND m.user_id = a.user_id) FROM assignments a WHERE a.id = :id")


@unit_of_work
def renew_lease(db: Session, user: User, assignment_id: int, *, members_only: bool = False,
                now: float | None = None) -> float:
    """Keep the caller's live lease on a task while they work on it: it then ends the
    project's lease_seconds from now (returned). NotFound, Forbidden (another annotator's
    task, a project they left) or Conflict (already_ranked, already_skipped, lease_expired)."""
    now = time.time() if now is None else now
    require_annotator(user)
    members_only = members_only and user.role != "admin"
    with transaction(db, write=True, durable=False) as tx:  # a lease, as lost as cheaply (raw_sql)
        until = _RENEW.scalar(tx, id=assignment_id, user=user.id, now=now, members_only=members_only)
    if until is not None:
        return until
    with transaction(db, write=False) as tx:
        row = _RENEW_REFUSED.first(tx, id=assignment_id)
    if row is None:
        raise NotFound(f"no task {assignment_id}")
    owner, status, member = row
    if owner != user.id:
        raise another_annotators(assignment_id)
    if members_only and not member:
        raise not_a_member(assignment_id)
    if status in ("done", "skipped"):
        what = "ranked" if status == "done" else "skipped"
        raise Conflict(f"task {assignment_id} is already {what}", code=f"already_{what}")
    raise Conflict(f"the lease on task {assignment_id} ran out and is not renewed; a ranking sent now still "
                   "counts if the prompt has a free slot", code="lease_expired")
