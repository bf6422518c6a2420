"""What a database must allow before align uses it, each refused in one line. Another
application's database: align creates its tables in an empty database, and migrates one of its
own (every schema version has its `align_meta` table); align's tables created beside another
application's would fail on a table of the same name (`users`), or write an account into it.
On PostgreSQL, the right to create tables, and the server connections a team server keeps open."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def creating_tables(where: str) -> Iterator[None]:
    """Around align's own DDL (migrate): PostgreSQL 15 and later let only a database's owner
    create tables in its `public` schema: a user without that right is told what to grant, in
    one line rather than the driver's error with the SQL in it."""
    from sqlalchemy.exc import ProgrammingError

    try:
        yield
    except ProgrammingError as exc:
        if getattr(exc.orig, "sqlstate", None) != "42501":  # insufficient_privilege
            raise
        reason = str(exc.orig).splitlines()[0]
        raise UserError(f"{where}: {reason}; align creates and migrates its own tables there: make the --db user "
                        "the database's owner, or GRANT CREATE ON SCHEMA public to it") from None


_CONNECTION_LIMITS = """
SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int
       - coalesce(current_setting('reserved_connections', true)::int, 0),
       (SELECT rolconnlimit FROM pg_roles WHERE rolname = current_user),
       (SELECT datconnlimit FROM pg_database WHERE datname = current_database()),
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'),
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND usename = current_user),
       (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND datname = current_database())
"""


def connections_problem(conn: Any, needed: int, asked: str) -> str | None:
    """Why a PostgreSQL server cannot give a team server the `needed` connections it opens as it
    starts (`asked`: the settings that ask for them), or None. Each worker opens all its pool's
    connections at once (annotation.pg_engine.open_connections); past the server's, role's or
    database's limit the server refuses them and the workers die one by one, each with its
    traceback, while uvicorn exits 0. `conn`'s own connection counts as in use: it closes before then."""
    from sqlalchemy import text

    server, role_limit, db_limit, in_use, role_use, db_use = conn.execute(text(_CONNECTION_LIMITS)).one()
    limits = [(server, in_use, "the server's max_connections less its reserved connections")]
    if role_limit >= 0:
        limits.append((role_limit, role_use, "the role's CONNECTION LIMIT"))
    if db_limit >= 0:
        limits.append((db_limit, db_use, "the database's CONNECTION LIMIT"))
    for limit, used, what in limits:
        free = limit - (used - 1)
        if needed > free:
            return (f"{asked} ask PostgreSQL for {needed} connections, and {what} leaves {free} ({limit}, "
                    f"{used - 1} in use by others): lower --workers or db_connections, or raise the limit")
    return None
