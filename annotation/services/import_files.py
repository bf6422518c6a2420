"""`align annotate import` and `POST /api/projects/{p}/import`: a file read, checked whole,
and stored as prompts (`imports.add_prompts`) or rankings (`ranking_import`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

import annotation.services.imports as imports
from annotation.models import Project, Prompt
from annotation.services._tx import unit_of_work
from annotation.services.errors import Invalid, ServiceError
from annotation.services.imports import ImportReport
from annotation.services.projects import MAX_CANDIDATES, check_project_name, get_or_create_project
from annotation.services.ranking_import import import_rankings


def import_body(db: Session, project_name: str, fmt: str, body: bytes) -> ImportReport:
    """`import_file` of a file sent as a request body (`POST /api/projects/{p}/import`);
    messages name it "body"."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        try:
            return import_file(db, project_name, fmt, tmp)
        except ServiceError as exc:
            raise type(exc)(str(exc).replace(tmp, "body")) from None
    finally:
        os.unlink(tmp)


@unit_of_work
def import_file(db: Session, project_name: str, fmt: str, path: Any, **project_kwargs: Any) -> ImportReport:
    """`align annotate import`: read FILE in `fmt` into the project (created if missing).
    The file is read and checked before anything is created."""
    with imports.cyclic_gc_paused():
        return _import_file(db, project_name, fmt, path, **project_kwargs)


def _import_file(db: Session, project_name: str, fmt: str, path: Any, **project_kwargs: Any) -> ImportReport:
    project_name = check_project_name(project_name)  # as a created project's name is stored
    asked = dict(project_kwargs)  # the project settings the import was given (for a project it creates)
    records = imports.read_records(fmt, path)
    where = _place_in(path)  # (prompts: the rankings import names its records itself)
    if fmt == "prompts":
        project_kwargs.setdefault("k", _file_k(records, where) or 4)
    else:
        project_kwargs.setdefault("k", min(MAX_CANDIDATES, max(2, max(len(r.responses) for r in records))))
    existed = db.scalar(select(Project.id).where(Project.name == project_name)) is not None
    project = get_or_create_project(db, project_name, **project_kwargs)
    if existed:  # set where a project is created: another value for an existing one would be ignored
        for key, value in asked.items():
            if getattr(project, key) != value:
                raise Invalid(f"project {project_name!r} exists with {key}={getattr(project, key)}, not {value}: "
                              f"{key} is set when an import creates a project (leave it out, or import into a new one)")
    try:
        if fmt == "prompts":
            return imports.add_prompts(db, project, records, where)
        return import_rankings(db, project, records, source=fmt, origin=str(path))
    except BaseException:
        db.rollback()
        # A file refused whole added nothing: leave no empty project behind. (One cut
        # short after some chunks keeps them, and its project.)
        if not existed and db.scalar(select(Prompt.id).where(Prompt.project_id == project.id).limit(1)) is None:
            db.execute(Project.__table__.delete().where(Project.id == project.id))
            db.commit()
        raise


def _place_in(path: Any) -> Callable[[int], str]:
    """Names record i of a JSONL file as its reader's messages do, "FILE:LINE" (record i is
    the file's i-th line that is not blank). The line numbers are read only when a message
    needs one: a file that is stored whole never pays for them."""
    lines: list[int] = []

    def where(i: int) -> str:
        if not lines:
            lines.extend(_record_lines(Path(path)))
        return f"{path}:{lines[i]}" if i < len(lines) else f"{path}: record {i + 1}"  # (a file changed since read)

    return where


def _record_lines(path: Path) -> list[int]:
    """The numbers of the lines `align.files.jsonl_rows` reads a record from (the same
    decoding and line ends: it skipped the blank ones)."""
    import gzip

    opened = gzip.open(path, "rt", encoding="utf-8-sig") if path.suffix == ".gz" else path.open(encoding="utf-8-sig")
    with opened as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


def _file_k(records: list, where: Callable[[int], str]) -> int | None:
    """The number of candidates the prompts of a file bring, which a project it creates
    ranks (None: they bring none), or the first record that makes it no K: a count no
    project ranks, or another than an earlier record's."""
    first = None
    for i, r in enumerate(records):
        n = len(r.candidates)
        if not n:
            continue
        problem = imports.candidate_count_problem(n, None)
        if problem:
            raise Invalid(f"{where(i)}: {imports.prompt_subject(r.prompt_id)} {problem}")
        if first is None:
            first = i
        elif n != len(records[first].candidates):
            raise Invalid(f"{where(i)}: {imports.prompt_subject(r.prompt_id)} has {n} candidates, where "
                          f"{where(first)} has {len(records[first].candidates)}; prompts have different numbers of "
                          "candidates but a project ranks one K")
    return None if first is None else len(records[first].candidates)
