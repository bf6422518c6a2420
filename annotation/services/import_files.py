"""`align annotate import` and `POST /api/projects/{p}/import`: a file read, checked whole,
and stored as prompts (`imports.add_prompts`) or rankings (`ranking_import`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

import annotation.services.imports as imports
from annotation.models import Project, Prompt
from annotation.services._tx import unit_of_work
from annotation.services.errors import Invalid, ServiceError
from annotation.services.imports import ImportReport
from annotation.services.projects import MAX_CANDIDATES, get_or_create_project
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
    records = imports.read_records(fmt, path)
    if fmt == "prompts":
        ks = {len(r.candidates) for r in records if r.candidates}
        if len(ks) > 1:
            raise Invalid(f"{path}: prompts have different numbers of candidates {sorted(ks)}; a project ranks one K")
        project_kwargs.setdefault("k", ks.pop() if ks else 4)
    else:
        project_kwargs.setdefault("k", min(MAX_CANDIDATES, max(2, max(len(r.responses) for r in records))))
    existed = db.scalar(select(Project.id).where(Project.name == project_name)) is not None
    project = get_or_create_project(db, project_name, **project_kwargs)
    try:
        if fmt == "prompts":
            return imports.add_prompts(db, project, records)
        return import_rankings(db, project, records, source=fmt, origin=str(path))
    except BaseException:
        db.rollback()
        # A file refused whole added nothing: leave no empty project behind. (One cut
        # short after some chunks keeps them, and its project.)
        if not existed and db.scalar(select(Prompt.id).where(Prompt.project_id == project.id).limit(1)) is None:
            db.execute(Project.__table__.delete().where(Project.id == project.id))
            db.commit()
        raise
