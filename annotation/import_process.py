"""The process the server runs API imports in (`anyio.to_process`): reading and checking a
large file is seconds of Python that, in a worker, would hold the GIL against the requests
it serves.

Nothing heavy is imported at the top of this module. The process gets the function by
unpickling it, which imports this module, and the function lowers the process's priority
before it loads the app (about 0.5 s of CPU): on a busy machine all of the import's work,
that included, then waits for the workers serving the annotators."""

from __future__ import annotations

from typing import Any

# The import process runs at this niceness (set once: the process runs imports only).
IMPORT_NICENESS = 10

_sessionmakers: dict[str, Any] = {}  # database URL -> sessionmaker, one engine per process


def import_body_at(db_url: str, project_name: str, fmt: str, body: bytes) -> Any:
    """`services.import_body` on the database at `db_url`; returns its ImportReport. The
    engine, kept for the next import, waits for the writer lock as long as the CLI."""
    import os

    if not _sessionmakers:
        os.nice(IMPORT_NICENESS)
    from annotation.db import make_engine, make_sessionmaker
    from annotation.services.import_files import import_body

    if db_url not in _sessionmakers:
        _sessionmakers[db_url] = make_sessionmaker(make_engine(db_url))
    with _sessionmakers[db_url]() as db:
        return import_body(db, project_name, fmt, body)
