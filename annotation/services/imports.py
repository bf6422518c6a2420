"""Adding prompts and candidates, and importing files of prompts or existing rankings."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from align.errors import UserError
from align.formats import Candidate as CandidateIn
from align.formats import PromptRecord
from align.text_checks import check_json_value
from annotation.db import refresh_planner_statistics
from annotation.models import Candidate, Project, Prompt
from annotation.raw_sql import on_postgresql
from annotation.services._tx import unit_of_work
from annotation.services.errors import Conflict, Invalid, StorageFull, disk_full
from annotation.services.projects import MAX_CANDIDATES
from annotation.services.rankings import check_text

IMPORT_FORMATS = ("oasst", "hh", "trl", "prompts", "kwise")
MAX_TEXT = 100_000  # characters in one prompt or candidate
# Records stored per transaction. A whole file is checked before anything is stored; it is
# then stored a chunk at a time, each chunk committed, so that an import of 100,000 prompts
# holds SQLite's writer lock for a chunk (about 30 ms of 100 prompts of K = 4) at a time, not
# for seconds, and annotators keep leasing and submitting in between. An import cut short (a
# crash, a kill) keeps the chunks it committed; importing the file again adds the rest.
IMPORT_CHUNK = 100
# After each chunk the import waits before it asks for the writer lock again, as long as
# its commit took (it holds the lock about that long) and at least IMPORT_PAUSE_S: without
# a pause the importing thread takes the lock back the moment it let go, ahead of the
# requests waiting for it (threads on an unfair lock, other workers polling its flock), and
# they starve for the whole import; with a fixed 10 ms one the import still held the lock
# three quarters of the time, and 200 rankings/s (400 short writes) fell behind.
IMPORT_PAUSE_S = 0.01
# ...and longer when the machine is busy, by as much as the chunk took longer than its
# own CPU time, up to this many times (`pause_after_chunk`).
IMPORT_MAX_BACKOFF = 8.0


@dataclass
class ImportReport:
    prompts_added: int = 0
    candidates_added: int = 0
    rankings_added: int = 0
    duplicates_skipped: int = 0


def _check_text(text: Any, what: str) -> str:
    return check_text(text, what, MAX_TEXT)


def checked_prompt(content: Any, what: str) -> Any:
    """A prompt as the database stores it: non-empty text or {role, content} messages, each
    text within MAX_TEXT; `what` names it in the 422."""
    if isinstance(content, str):
        if not content.strip():
            raise Invalid(f"{what} is empty")
        return _check_text(content, what)
    if isinstance(content, list) and content and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in content
    ):
        from align.chat import messages_problem

        problem = messages_problem(content)  # the roles a template renders, ending with the user's turn
        if problem:
            raise Invalid(f"{what}: {problem}")
        return [{"role": _check_text(m["role"], what), "content": _check_text(m["content"], what)} for m in content]
    raise Invalid(f"{what} must be text or a list of {{role, content}} messages")


def check_id(value: Any, what: str) -> str | None:
    """An optional source id or model name: 1-255 characters, no NUL (the column's bound)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 255 or "\x00" in value:
        raise Invalid(f"{what} must be 1-255 characters")
    return value


def insert_prompts(db: Session, project: Project, records: list[tuple[str, Any, list[CandidateIn]]], now: float,
                   candidate_source_ids: list[list[str | None]] | None = None) -> tuple[dict[str, int], list[list[int]]]:
    """Insert checked prompts (source id, content, candidates) and their candidates as two multi-row
    INSERTs on the tables (SQLAlchemy Core's INSERT ... RETURNING): a chunk holds SQLite's writer lock
    a fraction of the time the ORM's unit of work takes for the same rows, one object at a time (and
    the ORM's bulk path over the same rows added a tenth to the import's CPU). Returns the prompts'
    row ids by source id and each record's candidate row ids by position."""
    prompts = Prompt.__table__
    prompt_ids = dict(db.execute(insert(prompts).returning(prompts.c.source_id, prompts.c.id), [
        {"project_id": project.id, "source_id": sid, "content": content, "n_candidates": len(candidates),
         "slots_taken": 0, "done_count": 0, "created_at": now}
        for sid, content, candidates in records]).all())
    candidate_ids = insert_candidates(db, [(prompt_ids[sid], candidates) for sid, _content, candidates in records],
                                      candidate_source_ids)
    return prompt_ids, candidate_ids


def insert_candidates(db: Session, candidates_of: list[tuple[int, list[CandidateIn]]],
                      source_ids: list[list[str | None]] | None = None) -> list[list[int]]:
    """The candidates of prompts (row id, its candidates in order; `source_ids`: each candidate's id
    in the file it came from, else none) as one multi-row INSERT; their row ids, by prompt and position."""
    candidates = Candidate.__table__
    rows = [{"prompt_id": prompt_id, "position": i, "text": c.text, "model": c.model, "sampling": c.sampling,
             "source_id": None if source_ids is None else source_ids[k][i]}
            for k, (prompt_id, cands) in enumerate(candidates_of) for i, c in enumerate(cands)]
    if not rows:
        return [[] for _ in candidates_of]
    row_id = {(pid, pos): cid for pid, pos, cid in db.execute(
        insert(candidates).returning(candidates.c.prompt_id, candidates.c.position, candidates.c.id), rows).all()}
    return [[row_id[prompt_id, i] for i in range(len(cands))] for prompt_id, cands in candidates_of]


def checked_candidate(c: CandidateIn, i: int, owner: str) -> CandidateIn:
    """Candidate `i` of `owner` (a prompt or ranking, as the 422 names it: "prompt 'p1'"),
    its text, model and sampling settings checked."""
    return CandidateIn(_check_text(c.text, f"candidate {i} of {owner}"), check_id(c.model, "candidate model"),
                       _sampling(c.sampling))


def _sampling(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid("candidate sampling must be an object")
    try:
        return check_json_value(dict(value), "candidate sampling")
    except UserError as exc:
        raise Invalid(str(exc)) from None


def chunks(items: list, size: int = 0) -> Iterable[list]:
    """`items` in runs of `size` (IMPORT_CHUNK by default), one transaction each."""
    size = size or IMPORT_CHUNK
    return (items[i : i + size] for i in range(0, len(items), size))


class _Checked(NamedTuple):
    """A prompt record checked for storing: `i` its place (named by add_prompts' `where`),
    `given_id` the id the record gave (None: known by its content hash, `sid`)."""

    i: int
    sid: str
    given_id: str | None
    content: Any
    candidates: list[CandidateIn]


@dataclass
class _Held:
    """A prompt id as an import finds it: in the project (`prompt_id`) or earlier in the
    file (`new`: its place among the prompts the plan inserts), with its content, number
    of candidates and (read only where a record brings candidates to compare) their texts."""

    content: Any
    n: int
    texts: list[str]
    prompt_id: int | None = None
    new: int | None = None


@dataclass
class _Plan:
    """What a run of records stores: new prompts (with their candidates, or none) and
    candidates for stored prompts that had none; the rest is counted as duplicates."""

    new: list[tuple[str, Any, list[CandidateIn]]] = field(default_factory=list)
    attach: list[tuple[int, str, list[CandidateIn]]] = field(default_factory=list)  # prompt row id, its id, candidates
    duplicates: int = 0


def prompt_subject(given_id: Any) -> str:
    """How a message names a record's prompt: by the id the record gave, else "the prompt"
    (its content hash is no name the user knows)."""
    return f"prompt {given_id!r}" if isinstance(given_id, str) else "the prompt"


def candidate_count_problem(n: int, project: Project | None) -> str | None:
    """What is wrong with a prompt record's number of candidates `n` (none is fine: they are
    generated later), for `project` (None: one the file's K would create)."""
    if n and not 2 <= n <= MAX_CANDIDATES:
        return (f"has {n} candidate{'s' * (n != 1)}; a prompt is ranked among 2 to {MAX_CANDIDATES} candidates "
                "(give 2 or more, or none to generate them later)")
    if n and project is not None and n != project.k:
        return (f"has {n} candidates; project {project.name!r} ranks K={project.k} (send exactly {project.k}, "
                "or none to generate them later)")
    return None


def _read_held(db: Session, project: Project, records: list[_Checked]) -> dict[str, _Held]:
    """The project's prompts that `records` name, in one snapshot (no writer lock); the
    candidate texts of those that have candidates where a record brings some."""
    from annotation.db import begin_read_only

    sids = list(dict.fromkeys(r.sid for r in records))
    bringing = {r.sid for r in records if r.candidates}
    held: dict[str, _Held] = {}
    begin_read_only(db)
    for i in range(0, len(sids), 500):
        for pid, sid, content, n in db.execute(select(Prompt.id, Prompt.source_id, Prompt.content, Prompt.n_candidates)
                                               .where(Prompt.project_id == project.id,
                                                      Prompt.source_id.in_(sids[i : i + 500]))):
            held[sid] = _Held(content, n, [], pid)
    compared = {h.prompt_id: h for sid, h in held.items() if h.n and sid in bringing}
    ids = list(compared)
    for i in range(0, len(ids), 500):
        for pid, text in db.execute(select(Candidate.prompt_id, Candidate.text).where(
                Candidate.prompt_id.in_(ids[i : i + 500])).order_by(Candidate.prompt_id, Candidate.position)):
            compared[pid].texts.append(text)
    db.commit()  # ends the snapshot (a rollback would expire the project read before it)
    return held


def _plan(records: list[_Checked], held: dict[str, _Held], project: Project, where: Callable[[int], str]) -> _Plan:
    """What `records` store, given the prompts `held` (updated as the records are planned).
    A prompt id seen before is a duplicate, unless the record brings candidates for a
    prompt without any: they are attached. A prompt id that names other content, or other
    candidates than its prompt has, is refused (kept as "already present", the record's
    prompt or candidates were silently dropped)."""
    plan = _Plan()
    for r in records:
        texts = [c.text for c in r.candidates]
        h = held.get(r.sid)
        if h is None:
            held[r.sid] = _Held(r.content, len(texts), texts, new=len(plan.new))
            plan.new.append((r.sid, r.content, r.candidates))
        elif h.content != r.content:
            raise Invalid(f"{where(r.i)}: prompt id {r.sid!r} already names another prompt in project "
                          f"{project.name!r} or earlier in this import; give this prompt another id")
        elif not texts or sorted(texts) == sorted(h.texts):  # the same candidates, in any order
            plan.duplicates += 1
        elif h.n:
            raise Invalid(f"{where(r.i)}: {prompt_subject(r.given_id)} already has other candidates in project "
                          f"{project.name!r} or earlier in this import; a prompt's candidates are never replaced "
                          "(give these to a prompt of another id)")
        else:
            h.n, h.texts = len(texts), texts
            if h.new is not None:  # a prompt earlier in this file without candidates: stored with these
                plan.new[h.new] = (r.sid, r.content, r.candidates)
            else:
                plan.attach.append((h.prompt_id, r.sid, r.candidates))
    return plan


def _attach_candidates(db: Session, attach: list[tuple[int, str, list[CandidateIn]]]) -> None:
    """Give stored prompts without candidates these. A prompt that got candidates since
    the chunk was read (another import, `align annotate generate`) is a Conflict."""
    for prompt_id, sid, candidates in attach:
        taken = db.execute(Prompt.__table__.update().where(Prompt.id == prompt_id, Prompt.n_candidates == 0)
                           .values(n_candidates=len(candidates)))
        if taken.rowcount != 1:
            raise Conflict(f"prompt {sid!r} got candidates from another import or generate run at the same moment; "
                           "import the file again to add the rest (nothing is added twice)")
    insert_candidates(db, [(prompt_id, candidates) for prompt_id, _sid, candidates in attach])


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector does not run inside the block (it runs again
    after it, as it did before; nested blocks leave that to the outermost).

    An import builds hundreds of thousands of small acyclic objects (its records, their
    strings and lists), which reference counting frees; the collector walks them all
    again and again as they pile up. Reading and checking 100,000 prompts took 3.1 s of
    CPU with it and 0.8 s without, the whole import 9.1 and 7.3 s (on SQLite). And a
    full collection inside a chunk, 0.4 s at 100,000 prompts, kept every ranking waiting
    for the writer lock that long."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


@contextmanager
def chunk_transaction(db: Session) -> Iterator[None]:
    """One chunk of an import: the block writes it, then it is committed, which lets
    SQLite's writer lock go, and the requests waiting for that lock get their turn: the
    import pauses at least as long as it held the lock. No garbage collection runs
    between the chunk's first write and its commit (`cyclic_gc_paused`)."""
    started, started_cpu = time.monotonic(), time.thread_time()
    with cyclic_gc_paused():
        try:
            yield
            worked, cpu = time.monotonic() - started, time.thread_time() - started_cpu
            if on_postgresql(db):  # the database's work is another process's CPU: no measure of a busy machine
                worked = cpu
            db.commit()
        except IntegrityError:  # the same prompt ids added by another import at this moment
            db.rollback()
            raise Conflict("another import added some of these prompts at the same moment; import the file again "
                           "to add the rest (nothing is added twice)") from None
    if IMPORT_PAUSE_S:
        time.sleep(pause_after_chunk(time.monotonic() - started, worked, cpu))


@contextmanager
def stopped_by_full_disk(db: Session, report: ImportReport) -> Iterator[Callable[[], None]]:
    """The chunks of an import, each followed by a call of the function this yields (its
    counts are then stored): a full disk stops it with one line saying what it stored (the
    chunks committed stay, as an import cut short keeps them) and that importing the file
    again adds the rest."""
    stored = {"prompts": 0, "rankings": 0}

    def committed() -> None:
        stored.update(prompts=report.prompts_added, rankings=report.rankings_added)

    try:
        yield committed
    except OperationalError as exc:
        if not disk_full(exc):
            raise
        db.rollback()
        raise StorageFull(f"the database's disk is full: this import stored {stored['prompts']} prompts and "
                          f"{stored['rankings']} rankings before it stopped; free space and import the file "
                          "again to add the rest (nothing is added twice)") from None


def pause_after_chunk(held_s: float, worked_s: float, cpu_s: float) -> float:
    """Seconds an import waits after a chunk that held the writer lock `held_s` (its
    commit included), of which `worked_s` writing its rows, which took `cpu_s` of the
    import thread's CPU time.

    On SQLite the database runs in the import's thread: on an idle machine writing is
    CPU-bound (`worked_s` about `cpu_s`) and the import pauses as long as it held the
    lock. When `worked_s` is several times `cpu_s`, the import was kept off the CPU (by
    the server's workers, which outrank its niceness; by a CPU quota on the machine,
    which niceness does not help against, so that every core second the import takes is
    one the workers lack), or waited for the writer lock behind them: the machine is
    busy, and the import pauses that many times longer, up to IMPORT_MAX_BACKOFF. With the
    whole server held to 1.2 cores (a CPU quota), 200 rankings/s and an import of 100,000
    prompts, the p99 of next and submit while the chunks were stored was 0.8-4.6 s in
    three runs without this backoff, 0.09-1.8 s in four with it."""
    slowdown = worked_s / cpu_s if cpu_s > 0 else IMPORT_MAX_BACKOFF
    return max(IMPORT_PAUSE_S, held_s) * min(IMPORT_MAX_BACKOFF, max(1.0, slowdown))


def _checked_records(project: Project, records: list[PromptRecord], where: Callable[[int], str]) -> list[_Checked]:
    """Every record checked as a fresh import checks it, or the first problem as one Invalid
    that begins with the record's place (`where`)."""
    checked = []
    for i, rec in enumerate(records):
        try:
            checked.append(_checked_record(i, rec, project))
        except Invalid as exc:
            raise Invalid(f"{where(i)}: {exc}") from None
    return checked


def _checked_record(i: int, rec: PromptRecord, project: Project) -> _Checked:
    from align.formats import content_id

    given = check_id(rec.prompt_id, "the prompt's id")
    subject = prompt_subject(given)
    content = checked_prompt(rec.prompt, subject)
    problem = candidate_count_problem(len(rec.candidates), project)
    if problem:
        raise Invalid(f"{subject} {problem}")
    candidates = [checked_candidate(c, j + 1, subject) for j, c in enumerate(rec.candidates)]
    return _Checked(i, given or content_id("p", content), given, content, candidates)


def _item_of_request(i: int) -> str:
    return f"item {i + 1} of the request"


@unit_of_work
def add_prompts(db: Session, project: Project, records: list[PromptRecord],
                where: Callable[[int], str] = _item_of_request) -> ImportReport:
    """Add prompts, each with no candidates (to generate later) or exactly the project's K.
    A prompt already in the project (its id, else its content) is a duplicate, skipped, so
    importing the same file twice adds nothing; but candidates for one that has none are
    attached, and other candidates for one that has some are refused. Every record is
    checked before any is stored (one bad record and none is added; `where(i)` names record
    i in the message: "FILE:LINE"); they are then stored IMPORT_CHUNK at a time, each chunk
    planned (`_plan`) on what the project holds when it is stored."""
    report = ImportReport()
    now = time.time()
    checked = _checked_records(project, records, where)
    _plan(checked, _read_held(db, project, checked), project, where)  # refuses before anything is stored
    with stopped_by_full_disk(db, report) as committed:
        for chunk in chunks(checked):
            plan = _plan(chunk, _read_held(db, project, chunk), project, where)
            with chunk_transaction(db):
                if plan.new:
                    insert_prompts(db, project, plan.new, now)
                if plan.attach:
                    _attach_candidates(db, plan.attach)
            report.prompts_added += len(plan.new)
            report.candidates_added += sum(len(candidates) for *_ids, candidates in plan.new + plan.attach)
            report.duplicates_skipped += plan.duplicates
            committed()
    if report.prompts_added or report.candidates_added:
        refresh_planner_statistics(db)
    return report


@unit_of_work
def add_candidates(db: Session, prompt: Prompt, texts: list[str], model: str | None = None, sampling: dict | None = None) -> None:
    """Attach generated candidates to a prompt that has none yet (`align annotate generate`).
    A prompt that has some, also one that got them since `prompt` was read (another
    generate run or an import at the same moment), is a Conflict and keeps them."""
    k = db.scalar(select(Project.k).where(Project.id == prompt.project_id))
    if len(texts) != k:
        raise Invalid(f"need exactly K={k} candidates for prompt {prompt.source_id!r}, got {len(texts)}")
    candidates = [CandidateIn(_check_text(t, "candidate"), model, dict(sampling or {})) for t in texts]
    taken = db.execute(Prompt.__table__.update().where(Prompt.id == prompt.id, Prompt.n_candidates == 0)
                       .values(n_candidates=len(texts)))
    if taken.rowcount != 1:  # the count is taken in the same statement that checks it: one writer wins
        raise Conflict(f"prompt {prompt.source_id!r} already has candidates")
    insert_candidates(db, [(prompt.id, candidates)])
    db.commit()
    prompt.n_candidates = len(texts)


@unit_of_work
def prompts_without_candidates(db: Session, project: Project) -> list[Prompt]:
    return list(db.scalars(select(Prompt).where(Prompt.project_id == project.id, Prompt.n_candidates == 0).order_by(Prompt.id)))


def read_records(fmt: str, path: Any) -> list:
    """Read FILE in `fmt`; every problem (missing, not UTF-8, damaged gzip, bad line, no
    records) becomes one Invalid naming it."""
    import gzip
    import zlib

    from align import formats

    if fmt not in IMPORT_FORMATS:
        raise Invalid(f"unknown import format {fmt!r}; choose one of {', '.join(IMPORT_FORMATS)}")
    reader = {"prompts": formats.read_prompts, "oasst": formats.read_oasst, "hh": formats.read_hh,
              "trl": formats.read_trl_pairs, "kwise": formats.read_kwise}[fmt]
    try:
        records = reader(path)
    except UnicodeDecodeError as exc:
        raise Invalid(f"{path}: not UTF-8 text (byte {exc.start} of the decoded stream); save it as UTF-8") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise Invalid(f"{path}: damaged or truncated gzip file ({exc or type(exc).__name__})") from None
    except UserError as exc:
        raise Invalid(str(exc)) from None
    except (OSError, RecursionError) as exc:
        raise Invalid(f"{path}: cannot be read ({exc})") from None
    if not records:
        raise Invalid(f"{path}: no records (the file is empty); nothing imported")
    return records
