"""What a database URL names, for messages and for commands that must not touch the database's
own files: the URL with its password masked, and the files of a SQLite database."""

from __future__ import annotations

import re
from pathlib import Path

# Beside a SQLite database: its WAL, WAL index, rollback journal and the writer lock (db.py).
SQLITE_COMPANIONS = ("-wal", "-shm", "-journal", ".writer-lock")


def sqlite_file(url: str) -> str | None:
    """The database file of a sqlite:/// URL (None for in-memory and server databases)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""
    return None if not path or path == ":memory:" else path


def sqlite_files(url: str) -> list[Path]:
    """Every file a SQLite database at `url` is kept in, resolved (none for a server database)."""
    path = sqlite_file(url)
    return [] if path is None else [Path(path + tail).resolve() for tail in ("", *SQLITE_COMPANIONS)]


def masked(url: str) -> str:
    """`url` as a message may show it: the password as *** (SQLAlchemy's rendering, u:***@host)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not a URL it parses (a bad port): mask between "user:" and "@"
        return re.sub(r"(://[^/:@]*:)[^/]*@", r"\1***@", url)
