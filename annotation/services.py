"""The annotation service layer: plain functions over a SQLAlchemy `Session`.

Routes are thin wrappers around these, and `align demo` calls them directly so simulated
annotators rank through the same code path as people in the browser. Every function that
changes data commits its own unit of work; errors are `ServiceError`s carrying the HTTP
status the web layer answers with (they are `UserError`s, so the CLI prints them as one line).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from sqlalchemy import and_, delete, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from align.errors import UserError
from align.formats import Candidate as CandidateIn
from align.formats import PromptRecord, Ranking
from annotation import security
from annotation.models import (
    ApiToken,
    Assignment,
    Candidate,
    Invite,
    Project,
    Prompt,
    RankingRow,
    User,
    WebSession,
)

IMPORT_FORMATS = ("oasst", "hh", "trl", "prompts", "kwise")
EXPORT_FORMATS = ("kwise", "pairs", "hh")
MAX_CANDIDATES = 16
MAX_TEXT = 100_000  # characters in one prompt or candidate
MAX_REASON = 2_000


def unit_of_work(fn):
    """Every public service function ends its transaction before returning: commit on
    success, rollback on error. On SQLite each transaction holds the write lock (BEGIN
    IMMEDIATE), so a read left open after the last commit would block every other request."""
    import functools

    @functools.wraps(fn)
    def wrapper(db, *args, **kwargs):
        try:
            result = fn(db, *args, **kwargs)
        except BaseException:
            db.rollback()
            raise
        db.commit()
        return result

    return wrapper


def read_only(fn):
    """A service function that only reads: runs in a read-only transaction (no SQLite
    writer lock), ended before returning."""
    import functools

    from annotation.db import begin_read_only

    @functools.wraps(fn)
    def wrapper(db, *args, **kwargs):
        if db.info.get("align_read_only_depth"):  # nested: keep the caller's snapshot
            return fn(db, *args, **kwargs)
        begin_read_only(db)
        db.info["align_read_only_depth"] = 1
        try:
            return fn(db, *args, **kwargs)
        finally:
            db.info["align_read_only_depth"] = 0
            db.rollback()

    return wrapper


class ServiceError(UserError):
    status_code = 400

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code


class NotFound(ServiceError):
    status_code = 404


class Forbidden(ServiceError):
    status_code = 403


class Conflict(ServiceError):
    status_code = 409


class Invalid(ServiceError):
    status_code = 422


# --------------------------------------------------------------------------- users


@unit_of_work
def create_user(db: Session, username: str, password: str | None = None, role: str = "annotator") -> User:
    """Create a user; `password=None` makes an account that cannot log in (imported sources)."""
    username = (username or "").strip()
    if not username or len(username) > 64 or any(c.isspace() for c in username):
        raise Invalid("username must be 1-64 characters without spaces")
    if role not in ("admin", "annotator", "source"):
        raise Invalid(f"unknown role {role!r} (admin, annotator)")
    if password is not None and len(password) < security.MIN_PASSWORD_LENGTH:
        raise Invalid(f"password must be at least {security.MIN_PASSWORD_LENGTH} characters")
    if db.scalar(select(User.id).where(User.username == username)) is not None:
        raise Conflict(f"user {username!r} already exists")
    user = User(
        username=username,
        password_hash=security.hash_password(password) if password is not None else None,
        role=role,
        active=True,
        created_at=time.time(),
    )
    return _insert_unique(db, user, f"user {username!r} already exists")


def _insert_unique(db: Session, row: Any, conflict: str) -> Any:
    """Add and commit `row`; a unique-constraint race with another writer becomes a 409."""
    db.add(row)
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        raise Conflict(conflict) from None
    return row


@unit_of_work
def set_password(db: Session, user: User, password: str) -> None:
    if len(password) < security.MIN_PASSWORD_LENGTH:
        raise Invalid(f"password must be at least {security.MIN_PASSWORD_LENGTH} characters")
    user.password_hash = security.hash_password(password)
    db.commit()


@read_only
def get_user(db: Session, username: str) -> User:
    user = db.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"no user {username!r}")
    return user


@unit_of_work
def authenticate(db: Session, username: str, password: str) -> User | None:
    user = db.scalar(select(User).where(User.username == username))
    ok = security.verify_password(user.password_hash if user else None, password)
    return user if ok and user is not None and user.active and user.role != "source" else None


@unit_of_work
def issue_api_token(db: Session, user: User) -> str:
    token = "aln_" + security.new_token()
    db.add(ApiToken(user_id=user.id, token_hash=security.hash_token(token), created_at=time.time()))
    db.commit()
    return token


@read_only
def user_for_token(db: Session, token: str) -> User | None:
    row = db.execute(
        select(User).join(ApiToken, ApiToken.user_id == User.id).where(ApiToken.token_hash == security.hash_token(token))
    ).scalar_one_or_none()
    return row if row is not None and row.active else None


@unit_of_work
def open_web_session(db: Session, user: User, ttl_s: float = 12 * 3600) -> str:
    token = security.new_token()
    now = time.time()
    db.execute(delete(WebSession).where(WebSession.expires_at < now))
    db.add(WebSession(user_id=user.id, token_hash=security.hash_token(token), created_at=now, expires_at=now + ttl_s))
    db.commit()
    return token


@read_only
def user_for_session(db: Session, token: str) -> User | None:
    row = db.execute(
        select(User, WebSession.expires_at)
        .join(WebSession, WebSession.user_id == User.id)
        .where(WebSession.token_hash == security.hash_token(token))
    ).first()
    if row is None or row[1] < time.time() or not row[0].active:
        return None
    return row[0]


@unit_of_work
def close_web_session(db: Session, token: str) -> None:
    db.execute(delete(WebSession).where(WebSession.token_hash == security.hash_token(token)))
    db.commit()


@unit_of_work
def create_invite(db: Session, role: str = "annotator", ttl_s: float = 7 * 86400) -> str:
    if role not in ("admin", "annotator"):
        raise Invalid(f"unknown role {role!r} (admin, annotator)")
    token = security.new_token()
    now = time.time()
    db.add(Invite(token_hash=security.hash_token(token), role=role, created_at=now, expires_at=now + ttl_s))
    db.commit()
    return token


@unit_of_work
def accept_invite(db: Session, token: str, username: str, password: str) -> User:
    inv = db.scalar(select(Invite).where(Invite.token_hash == security.hash_token(token)))
    if inv is None or inv.used_by is not None or inv.expires_at < time.time():
        raise NotFound("this invite link is unknown, used or expired")
    user = create_user(db, username, password, inv.role)
    claimed = db.execute(update(Invite).where(Invite.id == inv.id, Invite.used_by.is_(None)).values(used_by=user.id))
    db.commit()
    if claimed.rowcount != 1:
        raise Conflict("this invite link was just used")
    return user


# --------------------------------------------------------------------------- projects


@unit_of_work
def create_project(
    db: Session,
    name: str,
    *,
    k: int = 4,
    annotators_per_prompt: int = 1,
    guidelines: str = "",
    lease_seconds: int = 900,
) -> Project:
    name = (name or "").strip()
    if not name or len(name) > 128 or "/" in name:
        raise Invalid("project name must be 1-128 characters without '/'")
    if not 2 <= k <= MAX_CANDIDATES:
        raise Invalid(f"k must be between 2 and {MAX_CANDIDATES}, got {k}")
    if not 1 <= annotators_per_prompt <= 100:
        raise Invalid(f"annotators_per_prompt must be between 1 and 100, got {annotators_per_prompt}")
    if lease_seconds < 10:
        raise Invalid(f"lease_seconds must be at least 10, got {lease_seconds}")
    if db.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise Conflict(f"project {name!r} already exists")
    project = Project(
        name=name,
        guidelines=guidelines or "",
        k=k,
        annotators_per_prompt=annotators_per_prompt,
        lease_seconds=lease_seconds,
        created_at=time.time(),
    )
    return _insert_unique(db, project, f"project {name!r} already exists")


@read_only
def get_project(db: Session, name: str) -> Project:
    project = db.scalar(select(Project).where(Project.name == name))
    if project is None:
        raise NotFound(f"no project {name!r}")
    return project


@unit_of_work
def get_or_create_project(db: Session, name: str, **kwargs: Any) -> Project:
    project = db.scalar(select(Project).where(Project.name == name))
    return project if project is not None else create_project(db, name, **kwargs)


@read_only
def list_projects(db: Session) -> list[Project]:
    return list(db.scalars(select(Project).order_by(Project.name)))


@dataclass
class ImportReport:
    prompts_added: int = 0
    candidates_added: int = 0
    rankings_added: int = 0
    duplicates_skipped: int = 0


def _check_text(text: Any, what: str) -> str:
    if not isinstance(text, str):
        raise Invalid(f"{what} must be a string")
    if len(text) > MAX_TEXT:
        raise Invalid(f"{what} is longer than {MAX_TEXT} characters")
    return text


def _check_prompt(content: Any, what: str) -> Any:
    if isinstance(content, str):
        if not content.strip():
            raise Invalid(f"{what} is empty")
        return _check_text(content, what)
    if isinstance(content, list) and content and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in content
    ):
        return [{"role": m["role"], "content": _check_text(m["content"], what)} for m in content]
    raise Invalid(f"{what} must be text or a list of {{role, content}} messages")


def _existing_source_ids(db: Session, project: Project, ids: Iterable[str]) -> set[str]:
    ids = list(ids)
    found: set[str] = set()
    for i in range(0, len(ids), 500):
        found.update(
            db.scalars(select(Prompt.source_id).where(Prompt.project_id == project.id, Prompt.source_id.in_(ids[i : i + 500])))
        )
    return found


def _new_prompt(project: Project, source_id: str, content: Any, cands: list[CandidateIn], now: float) -> Prompt:
    if len(cands) > MAX_CANDIDATES:
        raise Invalid(f"prompt {source_id!r} has {len(cands)} candidates; at most {MAX_CANDIDATES}")
    prompt = Prompt(
        project_id=project.id, source_id=source_id, content=content, n_candidates=len(cands),
        slots_taken=0, done_count=0, created_at=now,
    )
    prompt.candidates = [
        Candidate(position=i, text=_check_text(c.text, f"candidate {i} of prompt {source_id!r}"), model=c.model,
                  sampling=dict(c.sampling or {}), source_id=None)
        for i, c in enumerate(cands)
    ]
    return prompt


@unit_of_work
def add_prompts(db: Session, project: Project, records: list[PromptRecord]) -> ImportReport:
    """Add prompts (with or without candidates). Prompts whose id is already in the project
    are skipped, so importing the same file twice adds nothing."""
    report = ImportReport()
    now = time.time()
    from align.formats import content_id

    keyed = []
    for i, rec in enumerate(records):
        content = _check_prompt(rec.prompt, f"prompt {i + 1}")
        sid = rec.prompt_id or content_id("p", content)
        keyed.append((sid, content, rec))
    seen = _existing_source_ids(db, project, [s for s, _, _ in keyed])
    for sid, content, rec in keyed:
        if sid in seen:
            report.duplicates_skipped += 1
            continue
        seen.add(sid)
        if len(rec.candidates) == 1:
            raise Invalid(f"prompt {sid!r} has a single candidate; ranking needs at least 2 (or none, to generate later)")
        db.add(_new_prompt(project, sid, content, rec.candidates, now))
        report.prompts_added += 1
        report.candidates_added += len(rec.candidates)
    db.commit()
    return report


@unit_of_work
def add_candidates(db: Session, prompt: Prompt, texts: list[str], model: str | None = None, sampling: dict | None = None) -> None:
    """Attach generated candidates to a prompt that has none yet (`align annotate generate`)."""
    if prompt.n_candidates:
        raise Conflict(f"prompt {prompt.source_id!r} already has candidates")
    if not 2 <= len(texts) <= MAX_CANDIDATES:
        raise Invalid(f"need 2..{MAX_CANDIDATES} candidates, got {len(texts)}")
    for i, t in enumerate(texts):
        db.add(Candidate(prompt_id=prompt.id, position=i, text=_check_text(t, "candidate"), model=model, sampling=dict(sampling or {})))
    prompt.n_candidates = len(texts)
    db.commit()


@unit_of_work
def prompts_without_candidates(db: Session, project: Project) -> list[Prompt]:
    return list(db.scalars(select(Prompt).where(Prompt.project_id == project.id, Prompt.n_candidates == 0).order_by(Prompt.id)))


def _source_user(db: Session, name: str, cache: dict[str, User]) -> User:
    if name not in cache:
        user = db.scalar(select(User).where(User.username == name))
        if user is None:
            user = create_user(db, name, None, role="source")
        cache[name] = user
    return cache[name]


@unit_of_work
def import_rankings(db: Session, project: Project, rankings: list[Ranking], source: str) -> ImportReport:
    """Store existing preference data: each Ranking becomes a prompt with its candidates and
    one ranking row by the (non-login) user named after its annotator or the source."""
    report = ImportReport()
    now = time.time()
    from align.formats import content_id

    users: dict[str, User] = {}
    seen = _existing_source_ids(db, project, [r.prompt_id for r in rankings if r.prompt_id])
    for i, r in enumerate(rankings):
        content = _check_prompt(r.prompt, f"ranking {i + 1} prompt")
        sid = r.prompt_id or content_id(source, content, r.responses)
        if sid in seen:
            report.duplicates_skipped += 1
            continue
        seen.add(sid)
        if len(r.responses) < 2:
            raise Invalid(f"ranking {sid!r} has fewer than 2 responses")
        prompt = _new_prompt(project, sid, content, [CandidateIn(t) for t in r.responses], now)
        cand_ids = (r.meta or {}).get("candidate_ids") or []
        for c, cid in zip(prompt.candidates, cand_ids):
            c.source_id = None if cid is None else str(cid)
        prompt.slots_taken = prompt.done_count = 1
        db.add(prompt)
        db.flush()
        user = _source_user(db, r.annotator or source, users)
        ids = [c.id for c in prompt.candidates]
        db.add(
            RankingRow(
                project_id=project.id, prompt_id=prompt.id, user_id=user.id, assignment_id=None, revision=1,
                order=ranks_to_order(ids, r.ranks), all_bad=bool((r.meta or {}).get("all_bad", False)), skipped=False,
                rationale=(r.meta or {}).get("rationale"), time_spent_ms=None, created_at=now,
            )
        )
        report.prompts_added += 1
        report.candidates_added += len(ids)
        report.rankings_added += 1
    db.commit()
    return report


@unit_of_work
def import_file(db: Session, project_name: str, fmt: str, path: Any, **project_kwargs: Any) -> ImportReport:
    """`align annotate import`: read FILE in `fmt` into the project (created if missing)."""
    from align import formats

    if fmt not in IMPORT_FORMATS:
        raise Invalid(f"unknown import format {fmt!r}; choose one of {', '.join(IMPORT_FORMATS)}")
    if fmt == "prompts":
        records = formats.read_prompts(path)
        ks = {len(r.candidates) for r in records if r.candidates}
        project_kwargs.setdefault("k", max(ks) if ks else 4)
        project = get_or_create_project(db, project_name, **project_kwargs)
        return add_prompts(db, project, records)
    reader = {"oasst": formats.read_oasst, "hh": formats.read_hh, "trl": formats.read_trl_pairs, "kwise": formats.read_kwise}[fmt]
    rankings = reader(path)
    project_kwargs.setdefault("k", min(MAX_CANDIDATES, max([len(r.responses) for r in rankings] or [2])))
    project = get_or_create_project(db, project_name, **project_kwargs)
    return import_rankings(db, project, rankings, source=fmt)


# --------------------------------------------------------------------------- rankings


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
    of the task's candidates exactly once. Raises Invalid saying what is wrong."""
    if not isinstance(order, list) or not order:
        raise Invalid("order must be a non-empty list of groups of candidate ids, best first")
    flat: list[int] = []
    for group in order:
        if isinstance(group, int) and not isinstance(group, bool):
            group = [group]
        if not isinstance(group, list) or not group or not all(isinstance(c, int) and not isinstance(c, bool) for c in group):
            raise Invalid("each entry of order must be a candidate id or a non-empty list of candidate ids (a tie)")
        flat.extend(group)
    dupes = sorted({c for c in flat if flat.count(c) > 1})
    if dupes:
        raise Invalid(f"candidate ids appear more than once: {dupes}")
    unknown = sorted(set(flat) - set(candidate_ids))
    if unknown:
        raise Invalid(f"candidate ids not in this task: {unknown}")
    missing = sorted(set(candidate_ids) - set(flat))
    if missing:
        raise Invalid(f"order leaves out candidate ids {missing}; rank every candidate (ties allowed)")
    return [[c] if isinstance(c, int) else list(c) for c in order]


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
    if user.role == "source":
        raise Forbidden("imported-data accounts do not annotate")
    begin_read_only(db)
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
        prompts = {p.id: p for p in db.scalars(select(Prompt).where(Prompt.id.in_(lowest)))}
        expired = {a.prompt_id: a.id for a in db.scalars(
            select(Assignment).where(Assignment.user_id == user.id, Assignment.prompt_id.in_(lowest)))}
        db.commit()  # end the snapshot; the claim below is one short write transaction
        for pid in lowest:
            if not _take_slot(db, project, pid):
                continue
            order = [c.id for c in prompts[pid].candidates]
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
            return Task(
                assignment_id=aid, project=project.name, prompt_id=pid, prompt=prompts[pid].content,
                candidates=[TaskCandidate(c.id, c.text) for c in sorted(prompts[pid].candidates, key=lambda c: order.index(c.id))],
                status="leased", leased_until=until, guidelines=project.guidelines,
            )
        db.rollback()
    return None


def _own_assignment(db: Session, user: User, assignment_id: int) -> Assignment:
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


def _clean_optional_text(value: Any, what: str, limit: int = MAX_REASON) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Invalid(f"{what} must be a string")
    if len(value) > limit:
        raise Invalid(f"{what} is longer than {limit} characters")
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
    rationale = _clean_optional_text(rationale, "rationale")
    time_spent_ms = _clean_time(time_spent_ms)
    if a.status in ("done", "skipped"):
        raise Conflict(f"task {assignment_id} is already {'ranked' if a.status == 'done' else 'skipped'}; "
                       "send a revision (PUT) to correct a ranking")
    project = db.get(Project, a.project_id)
    db.commit()  # end the snapshot: the conditional updates below re-check everything they rely on
    if a.status == "expired" or a.leased_until < now:
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
        all_bad=bool(all_bad), skipped=False, skip_reason=None, rationale=rationale, time_spent_ms=time_spent_ms,
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
    rationale = _clean_optional_text(rationale, "rationale")
    time_spent_ms = _clean_time(time_spent_ms)
    if a.status != "done":
        raise Conflict(f"task {assignment_id} has no ranking to revise yet (status {a.status}); submit it first (POST)")
    for _ in range(3):
        last = db.scalar(select(func.max(RankingRow.revision)).where(RankingRow.assignment_id == a.id)) or 0
        row = RankingRow(
            project_id=a.project_id, prompt_id=a.prompt_id, user_id=user.id, assignment_id=a.id, revision=last + 1,
            order=order, all_bad=bool(all_bad), skipped=False, skip_reason=None, rationale=rationale,
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
    reason = _clean_optional_text(reason, "reason")
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


# --------------------------------------------------------------------------- export / stats


@read_only
def latest_rankings(db: Session, project: Project, *, include_skipped: bool = False, all_revisions: bool = False) -> list[tuple[RankingRow, User, Prompt]]:
    q = (
        select(RankingRow, User, Prompt)
        .join(User, User.id == RankingRow.user_id)
        .join(Prompt, Prompt.id == RankingRow.prompt_id)
        .where(RankingRow.project_id == project.id)
        .order_by(Prompt.id, User.username, RankingRow.revision)
    )
    if not all_revisions:
        latest = (
            select(RankingRow.prompt_id, RankingRow.user_id, func.max(RankingRow.revision).label("rev"))
            .where(RankingRow.project_id == project.id)
            .group_by(RankingRow.prompt_id, RankingRow.user_id)
            .subquery()
        )
        q = q.join(
            latest,
            and_(latest.c.prompt_id == RankingRow.prompt_id, latest.c.user_id == RankingRow.user_id, latest.c.rev == RankingRow.revision),
        )
    rows = [tuple(r) for r in db.execute(q).all()]
    return [r for r in rows if include_skipped or not r[0].skipped]


@read_only
def export_rankings(db: Session, project: Project, *, all_revisions: bool = False) -> list[Ranking]:
    """The project's rankings as `Ranking`s (latest revision per annotator and prompt unless
    `all_revisions`); responses in their original order, ranks 0 = best with ties."""
    out = []
    for row, user, prompt in latest_rankings(db, project, all_revisions=all_revisions):
        cands = prompt.candidates
        ids = [c.id for c in cands]
        out.append(
            Ranking(
                prompt=prompt.content,
                responses=[c.text for c in cands],
                ranks=order_to_ranks(ids, row.order),
                annotator=user.username,
                prompt_id=prompt.source_id,
                meta={
                    "all_bad": row.all_bad,
                    "candidate_ids": [c.source_id or str(c.id) for c in cands],
                    "models": [c.model for c in cands],
                    "rationale": row.rationale,
                    "revision": row.revision,
                    "time_spent_ms": row.time_spent_ms,
                },
            )
        )
    return out


@read_only
def export_rows(db: Session, project: Project, fmt: str) -> list[dict[str, Any]]:
    from align import formats

    if fmt not in EXPORT_FORMATS:
        raise Invalid(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    rankings = export_rankings(db, project)
    if fmt == "kwise":
        return [formats.kwise_row(r) for r in rankings]
    if fmt == "pairs":
        return formats.pairs_from_rankings(rankings)
    return formats.hh_from_rankings(rankings)


@read_only
def user_progress(db: Session, user: User, project: Project) -> dict[str, int]:
    done = db.scalar(select(func.count()).where(Assignment.user_id == user.id, Assignment.project_id == project.id, Assignment.status == "done"))
    return {"done": int(done or 0)}


@read_only
def project_progress(db: Session, project: Project) -> dict[str, int]:
    n_prompts, done, rankable = db.execute(
        select(func.count(Prompt.id), func.coalesce(func.sum(Prompt.done_count), 0), func.count(Prompt.id).filter(Prompt.n_candidates >= 2))
        .where(Prompt.project_id == project.id)
    ).one()
    target = int(rankable) * project.annotators_per_prompt
    return {"prompts": int(n_prompts), "rankable_prompts": int(rankable), "rankings": int(done), "target": target}


@read_only
def dashboard(db: Session, project: Project) -> dict[str, Any]:
    """Progress, per-annotator counts and median time, agreement metrics and flagged items."""
    from statistics import median

    from annotation import metrics

    rows = latest_rankings(db, project, include_skipped=True)
    per_user: dict[str, dict[str, Any]] = {}
    by_prompt: dict[int, dict[str, list[int]]] = {}
    flagged: dict[int, dict[str, Any]] = {}
    prompts: dict[int, Prompt] = {}
    for row, user, prompt in rows:
        prompts[prompt.id] = prompt
        u = per_user.setdefault(user.username, {"rankings": 0, "skips": 0, "all_bad": 0, "times": []})
        if row.skipped:
            u["skips"] += 1
            flagged.setdefault(prompt.id, {"prompt_id": prompt.source_id, "reasons": []})["reasons"].append(f"skipped by {user.username}: {row.skip_reason}")
            continue
        u["rankings"] += 1
        if row.time_spent_ms is not None:
            u["times"].append(row.time_spent_ms)
        if row.all_bad:
            u["all_bad"] += 1
            flagged.setdefault(prompt.id, {"prompt_id": prompt.source_id, "reasons": []})["reasons"].append(f"all bad ({user.username})")
        ids = [c.id for c in prompt.candidates]
        by_prompt.setdefault(prompt.id, {})[user.username] = order_to_ranks(ids, row.order)
    for pid, tau in metrics.per_item_tau(by_prompt).items():
        if tau < 0:
            flagged.setdefault(pid, {"prompt_id": prompts[pid].source_id, "reasons": []})["reasons"].append(f"annotators disagree (mean tau {tau:.2f})")
    annotators = [
        {"username": name, "rankings": u["rankings"], "skips": u["skips"], "all_bad": u["all_bad"],
         "median_time_s": (median(u["times"]) / 1000.0) if u["times"] else None}
        for name, u in sorted(per_user.items())
    ]
    return {
        "project": project.name,
        "progress": project_progress(db, project),
        "annotators": annotators,
        "agreement": metrics.agreement_report(by_prompt),
        "flagged": list(flagged.values())[:200],
    }
