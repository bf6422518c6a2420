"""Adding prompts and candidates, and importing files of prompts or existing rankings."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
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


def _existing_source_ids(db: Session, project: Project, ids: Iterable[str]) -> set[str]:
    ids = list(ids)
    found: set[str] = set()
    for i in range(0, len(ids), 500):
        found.update(
            db.scalars(select(Prompt.source_id).where(Prompt.project_id == project.id, Prompt.source_id.in_(ids[i : i + 500])))
        )
    return found


def _insert_prompts(db: Session, project: Project, records: list[tuple[str, Any, list[CandidateIn]]], now: float) -> None:
    """Insert checked prompts and their candidates as two multi-row INSERTs on the tables
    (SQLAlchemy Core's INSERT ... RETURNING): a chunk holds SQLite's writer lock a fraction
    of the time the ORM's unit of work takes for the same rows, one object at a time (and
    the ORM's bulk path over the same rows added a tenth to the import's CPU)."""
    from sqlalchemy import insert

    prompts = Prompt.__table__
    prompt_ids = dict(db.execute(insert(prompts).returning(prompts.c.source_id, prompts.c.id), [
        {"project_id": project.id, "source_id": sid, "content": content, "n_candidates": len(candidates),
         "slots_taken": 0, "done_count": 0, "created_at": now}
        for sid, content, candidates in records]).all())
    rows = [{"prompt_id": prompt_ids[sid], "position": i, "text": c.text, "model": c.model, "sampling": c.sampling,
             "source_id": None}
            for sid, _content, candidates in records for i, c in enumerate(candidates)]
    if rows:
        db.execute(insert(Candidate.__table__), rows)


def checked_candidate(c: CandidateIn, i: int, owner: str) -> CandidateIn:
    """Candidate `i` of `owner` (a prompt or ranking, as the 422 names it: "prompt 'p1'"),
    its text, model and sampling settings checked."""
    return CandidateIn(_check_text(c.text, f"candidate {i} of {owner}"), check_id(c.model, "candidate model"),
                       _sampling(c.sampling))


def new_prompt(project: Project, source_id: str, content: Any, cands: list[CandidateIn], now: float) -> Prompt:
    """A prompt row with its candidates, all checked already."""
    prompt = Prompt(
        project_id=project.id, source_id=source_id, content=content, n_candidates=len(cands),
        slots_taken=0, done_count=0, created_at=now,
    )
    prompt.candidates = [Candidate(position=i, text=c.text, model=c.model, sampling=c.sampling, source_id=None)
                         for i, c in enumerate(cands)]
    return prompt


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


def _new_in_chunk(db: Session, project: Project, chunk: list, source_id: Callable[[Any], str],
                  report: ImportReport) -> list:
    """The records of a chunk whose prompt id is not in the project yet, nor earlier in the
    file, read in a snapshot before the chunk's write (no writer lock while its rows are
    built; an import adding the same ids meanwhile makes the commit a Conflict); the others
    are counted as duplicates."""
    from annotation.db import begin_read_only

    begin_read_only(db)
    present = _existing_source_ids(db, project, [source_id(r) for r in chunk])
    db.commit()  # ends the snapshot (a rollback would expire the project read before it)
    new = []
    for record in chunk:
        if source_id(record) in present:
            report.duplicates_skipped += 1
        else:
            present.add(source_id(record))
            new.append(record)
    return new


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


def _refuse_reused_ids(db: Session, project: Project, keyed: list[tuple[str, Any, list]]) -> None:
    """A prompt id that the project, or an earlier record, gives another prompt is refused
    before anything is stored (as the rankings import refuses it): kept as "already
    present", the file's prompt was silently dropped."""
    from annotation.db import begin_read_only

    content_of: dict[str, Any] = {}
    begin_read_only(db)
    ids = list(dict.fromkeys(sid for sid, _content, _cands in keyed))
    for i in range(0, len(ids), 500):
        content_of.update(db.execute(select(Prompt.source_id, Prompt.content).where(
            Prompt.project_id == project.id, Prompt.source_id.in_(ids[i : i + 500]))).all())
    db.commit()  # ends the snapshot (a rollback would expire the project read before it)
    for sid, content, _candidates in keyed:
        if content_of.setdefault(sid, content) != content:
            raise Invalid(f"prompt id {sid!r} already names another prompt in project {project.name!r} or in this "
                          "file; give this prompt another id")


@unit_of_work
def add_prompts(db: Session, project: Project, records: list[PromptRecord]) -> ImportReport:
    """Add prompts, each with no candidates (to generate later) or exactly the project's K.
    Prompts whose id is already in the project are skipped, so importing the same file
    twice adds nothing. Every record is checked before any is stored (one bad record and
    none is added); they are then stored IMPORT_CHUNK at a time."""
    report = ImportReport()
    now = time.time()
    from align.formats import content_id

    keyed = []
    for i, rec in enumerate(records):
        content = checked_prompt(rec.prompt, f"prompt {i + 1}")
        sid = check_id(rec.prompt_id, f"id of prompt {i + 1}") or content_id("p", content)
        if rec.candidates and len(rec.candidates) != project.k:
            raise Invalid(f"prompt {sid!r} has {len(rec.candidates)} candidates; project {project.name!r} ranks "
                          f"K={project.k} (send exactly {project.k}, or none to generate them later)")
        if len(rec.candidates) > MAX_CANDIDATES:
            raise Invalid(f"prompt {sid!r} has {len(rec.candidates)} candidates; at most {MAX_CANDIDATES}")
        keyed.append((sid, content, [checked_candidate(c, i, f"prompt {sid!r}") for i, c in enumerate(rec.candidates)]))
    _refuse_reused_ids(db, project, keyed)
    with stopped_by_full_disk(db, report) as committed:
        for chunk in chunks(keyed):
            new = _new_in_chunk(db, project, chunk, lambda record: record[0], report)
            with chunk_transaction(db):
                if new:
                    _insert_prompts(db, project, new, now)
            report.prompts_added += len(new)
            report.candidates_added += sum(len(candidates) for _sid, _content, candidates in new)
            committed()
    if report.prompts_added:
        refresh_planner_statistics(db)
    return report


@unit_of_work
def add_candidates(db: Session, prompt: Prompt, texts: list[str], model: str | None = None, sampling: dict | None = None) -> None:
    """Attach generated candidates to a prompt that has none yet (`align annotate generate`)."""
    if prompt.n_candidates:
        raise Conflict(f"prompt {prompt.source_id!r} already has candidates")
    k = db.scalar(select(Project.k).where(Project.id == prompt.project_id))
    if len(texts) != k:
        raise Invalid(f"need exactly K={k} candidates for prompt {prompt.source_id!r}, got {len(texts)}")
    for i, t in enumerate(texts):
        db.add(Candidate(prompt_id=prompt.id, position=i, text=_check_text(t, "candidate"), model=model, sampling=dict(sampling or {})))
    db.execute(Prompt.__table__.update().where(Prompt.id == prompt.id).values(n_candidates=len(texts)))
    prompt.n_candidates = len(texts)
    db.commit()


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
