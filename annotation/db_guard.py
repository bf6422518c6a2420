"""Another application's database is refused before align writes to it. align creates its
tables in an empty database, and migrates one of its own (every schema version has its
`align_meta` table); a --db that named another application's SQLite file had align's tables
created beside that application's, and the command then failed on a table of the same name
(`users`) with a traceback, or succeeded and wrote an account into it."""

from __future__ import annotations

from typing import Any

from align.errors import UserError
from annotation.models import Meta

MARKER_TABLE = Meta.__tablename__  # the table every align database has had since v1
_NAMED = 8  # foreign tables a message names (then "and N more")
# a PostgreSQL extension's own table in every database it is installed in (PostGIS: the postgis images)
EXTENSION_TABLES = frozenset({"spatial_ref_sys"})


def foreign_tables(conn: Any) -> list[str]:
    """The tables of the database `conn` is connected to, when they are another application's
    (sorted); none when it is empty or align's own. Read through SQLAlchemy's inspector, so
    the same on PostgreSQL (its default schema) as on SQLite."""
    from sqlalchemy import inspect

    names = inspect(conn).get_table_names()
    return [] if MARKER_TABLE in names else sorted(set(names) - EXTENSION_TABLES)


def refuse_foreign(conn: Any, where: str) -> None:
    """UserError naming `where` (the file, or the masked URL) and the tables it holds, if the
    database of `conn` is another application's."""
    tables = foreign_tables(conn)
    if tables:
        named = ", ".join(tables[:_NAMED]) + (f" and {len(tables) - _NAMED} more" if len(tables) > _NAMED else "")
        raise UserError(f"{where} is not an align annotation database (it has no {MARKER_TABLE} table but holds "
                        f"another application's tables: {named}); nothing was written to it: give --db a new "
                        "file or an align database")


def refuse_foreign_sqlite_file(path: str | None) -> None:
    """`refuse_foreign` for the SQLite file at `path` (None: in memory, nothing to check),
    through a connection that only reads it.
    Checked before align's first connection, which switches the file to WAL mode and makes a
    writer lock beside it. When the file cannot be read so (it is not there yet, is no
    database, is locked), nothing is said here: the open that follows creates it or says why,
    and `migrate` checks again once it holds the migration lock."""
    import sqlite3
    from urllib.parse import quote

    from sqlalchemy import create_engine
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.pool import NullPool

    if path is None:
        return
    engine = create_engine("sqlite://", poolclass=NullPool,  # read-only: a missing file is not created
                           creator=lambda: sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True))
    try:
        with engine.connect() as conn:
            refuse_foreign(conn, path)
    except DBAPIError:
        pass
    finally:
        engine.dispose()
