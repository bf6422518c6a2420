"""The process the server runs its heavy API requests in (`anyio.to_process`): imports, exports and
dashboards. Reading and checking a large file, or building the rows of a large project, is seconds
of Python and of garbage collection over a heap of millions of objects; in a worker it would hold
the GIL against the requests it serves (an export of 100,000 rankings stalled annotators' pages for
seconds at a time).

Nothing heavy is imported at the top of this module. The process gets a function by unpickling
it, which imports this module, and the first function it runs lowers the process's priority before
it loads the app (about 0.5 s of CPU): on a busy machine all of the request's work, that included,
then waits for the workers serving the annotators.

The process ends with the server: on Linux the kernel kills it when the server does (an import
went on writing to the database for seconds after a SIGKILL of the server, orphaned; anyio
notices a parent gone only when the request is over). What it had not committed, the database
rolls back; what it had, an import's chunks, is whole. Elsewhere the process ends when it finishes
its request and reads the closed pipe."""

from __future__ import annotations

from typing import Any

# The process runs at this niceness (set once: it runs these requests only).
NICENESS = 10

_sessionmakers: dict[str, Any] = {}  # database URL -> sessionmaker, one engine per process
_lowered = False  # the process's priority, and its tie to the server, once

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _lower_priority() -> None:
    """Once, as the process's first request starts, before it loads anything of the app."""
    global _lowered
    import os

    if not _lowered:
        end_with_parent()
        os.nice(NICENESS)
        _lowered = True


def end_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux only; a no-op elsewhere):
    strictly, when the parent's thread that started it ends, the server's event loop thread,
    which lives as long as the server. SIGKILL is what anyio sends a process whose request was
    cancelled too. A parent that died between its pid being read here and the signal being set
    leaves another parent pid behind: then end now."""
    import ctypes
    import os
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0
    except (OSError, AttributeError):  # a libc without prctl (or none loadable): as elsewhere
        return
    if not failed and os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)


def _session(db_url: str) -> Any:
    """A session on the database at `db_url`; the engine, kept for the next request, waits for the
    writer lock as long as the CLI."""
    from annotation.db import make_engine, make_sessionmaker

    if db_url not in _sessionmakers:
        _sessionmakers[db_url] = make_sessionmaker(make_engine(db_url))
    return _sessionmakers[db_url]()


def import_body_at(db_url: str, project_name: str, fmt: str, body: bytes) -> Any:
    """`services.import_body` on the database at `db_url`; returns its ImportReport."""
    _lower_priority()
    from annotation.services.import_files import import_body

    with _session(db_url) as db:
        return import_body(db, project_name, fmt, body)


def export_file_at(db_url: str, project_name: str, fmt: str, all_revisions: bool, out: str) -> list[str]:
    """`services.write_export` of the project to the file `out`; returns the notes of what the format
    left out."""
    _lower_priority()
    from annotation import services

    with _session(db_url) as db:
        return services.write_export(db, services.get_project(db, project_name), fmt, out, all_revisions=all_revisions)[1]


def dashboard_at(db_url: str, project_name: str) -> dict[str, Any]:
    """`services.dashboard` of the project on the database at `db_url`."""
    _lower_priority()
    from annotation import services

    with _session(db_url) as db:
        return services.dashboard(db, services.get_project(db, project_name))
