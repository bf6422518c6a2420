"""Hand-written statements for the request hot path (sign-in lookups, leasing, storing a
ranking), run in short transactions on a pooled DBAPI connection.

SQLAlchemy spends about 0.1 ms of Python on each statement and about 0.3 ms on each
session transaction; sqlite3 runs these statements in about 0.01 ms. On a small server
that difference is most of what a ranking costs, so the few statements every ranking
makes skip it. They keep the same guarantees: on SQLite a write transaction is BEGIN
IMMEDIATE under the process's writer lock (`annotation.db`), a read is a WAL snapshot
that blocks nobody; every transaction commits or rolls back before its connection goes
back to the pool; driver errors become SQLAlchemy's exceptions (IntegrityError, ...). On
PostgreSQL, where every statement is a round trip to the server, reads and the writes
that are one statement run in autocommit (`autocommit`), with no BEGIN or COMMIT.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

from sqlalchemy import Table
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class Transaction:
    """An open transaction on a DBAPI connection (see `transaction`)."""

    def __init__(self, connection: Any, dialect: Any):
        self.connection, self.dialect = connection, dialect
        self.sqlite = dialect.name == "sqlite"


def on_postgresql(db: Session) -> bool:
    return db.get_bind().dialect.name == "postgresql"


_HELD = "align.raw_connection"


def hold_connection(db: Session) -> None:
    """Let the statements run for `db` share one pooled connection, taken at the first and
    kept until `release_connection`. A ranking's two requests make five to eight short
    transactions, and a checkout and checkin cost the pool about 0.06 ms of Python each
    time (holding one per request saved 0.4 ms of CPU per ranking, in process). For a web
    request's Session, which lives as long as the request, one is enough. Transactions
    stay as short as before; only the connection is kept between them."""
    db.info[_HELD] = None


def release_connection(db: Session) -> None:
    """Give back the connection `hold_connection` kept, if one was taken."""
    pooled = db.info.pop(_HELD, None)
    if pooled is not None:
        _give_back(pooled, db.get_bind().dialect)


def _give_back(pooled: Any, dialect: Any) -> None:
    """Return a connection to the pool as the pool handed it out: on PostgreSQL, not in
    autocommit (an `autocommit` block leaves it on, for the next block on a held
    connection: switching costs the driver a lock and a generator each time)."""
    connection = pooled.dbapi_connection
    if dialect.name == "postgresql" and connection is not None and connection.autocommit:
        try:
            connection.autocommit = False
        except Exception:  # a broken connection: the pool must not hand it out again
            pooled.invalidate()
    pooled.close()


@contextmanager
def _checkout(db: Session) -> Iterator[tuple[Any, Any]]:
    """A DBAPI connection from `db`'s pool, back in the pool when the block ends (or, for
    a Session that holds one, when it is released). `db`'s own transaction, if any, is
    committed first, as every service function does (on SQLite it may hold the writer
    lock)."""
    if db.in_transaction():
        db.commit()
    engine = db.get_bind()
    held = _HELD in db.info
    pooled = db.info.get(_HELD) or engine.raw_connection()
    if held:
        db.info[_HELD] = pooled
    try:
        yield pooled.dbapi_connection, engine.dialect
    except BaseException:
        if held:  # a connection that failed is not reused: the pool checks it on return
            db.info[_HELD] = None
        _give_back(pooled, engine.dialect)
        raise
    else:
        if not held:
            _give_back(pooled, engine.dialect)


@contextmanager
def transaction(db: Session, *, write: bool, durable: bool = True) -> Iterator[Transaction]:
    """A transaction of its own on a connection from `db`'s pool: committed when the block
    ends, rolled back if it raises. A write that is not `durable` commits without waiting
    for the disk (SQLite: synchronous=NORMAL in WAL mode; PostgreSQL: synchronous_commit
    off for this transaction): a crash of the server loses nothing, a power cut may lose
    it, and the next durable commit, whose flush of the log covers all before it, makes it
    durable too. For what costs nothing to lose: a task's lease (the annotator reloads),
    never a ranking. Under load that halves the flushes a ranking waits for, and on SQLite
    the time the writer lock is held."""
    if not write and on_postgresql(db):
        # On PostgreSQL a read runs in autocommit: each statement reads its own snapshot
        # and no BEGIN or COMMIT round trip is made (what reads do here does not need one
        # snapshot: the write that acts on it re-checks with conditional updates).
        with autocommit(db) as tx:
            yield tx
        return
    with _checkout(db) as (connection, dialect):
        if dialect.name == "sqlite":
            connection.begin(write=write, durable=durable)
        else:
            if connection.autocommit:  # left on by an `autocommit` block before this one
                connection.autocommit = False
            if not durable:
                connection.execute("SET LOCAL synchronous_commit TO off")
        try:
            yield Transaction(connection, dialect)
            connection.commit()
        except BaseException:
            connection.rollback()
            raise


@contextmanager
def autocommit(db: Session) -> Iterator[Transaction]:
    """PostgreSQL only: every statement in the block is a transaction of its own, with no
    BEGIN or COMMIT round trip. For reads that need no common snapshot, and for writes
    done in one statement (data-modifying WITH queries), which are atomic by themselves.
    Each round trip costs both the server and the driver about 0.1 ms of CPU, and on a
    small server that is a good part of what a ranking costs."""
    with _checkout(db) as (connection, dialect):
        if dialect.name != "postgresql":
            raise RuntimeError("autocommit blocks are for PostgreSQL; use transaction() on SQLite")
        if not connection.autocommit:  # left on for the next block; off again when given back
            connection.autocommit = True
        yield Transaction(connection, dialect)


class Insert(NamedTuple):
    """The two halves of a hand-written INSERT: `into` ("INSERT INTO t (a, b)") and `values`,
    the matching expressions ("x, y"), to follow as "VALUES (...)" or "SELECT ... FROM"."""

    into: str
    values: str


_QUOTE = DefaultDialect().identifier_preparer.quote  # "order" is reserved; SQLite and PostgreSQL quote alike


def insert_into(table: Table, **values: str) -> Insert:
    """An INSERT into `table` that names every column of its model but the generated id,
    in the model's order, each with its SQL expression from `values`. The model is the one
    definition of the table: these statements are built from it at import, and a column
    added to the model that a statement gives no value for (or a value for a column it
    does not have) is an error there, not a NULL the hot path writes where the ORM would
    write the model's default."""
    columns = [c.name for c in table.columns if c is not table.autoincrement_column]
    missing = [name for name in columns if name not in values]
    unknown = sorted(set(values) - set(columns))
    if missing or unknown:
        raise ValueError(f"an INSERT into {table.name} must give every column of the model a value: "
                         f"missing {missing}, not in the model {unknown}")
    return Insert(f"INSERT INTO {table.name} ({', '.join(_QUOTE(name) for name in columns)})",
                  ", ".join(values[name] for name in columns))


class Sql:
    """One statement with named parameters written `:name` (the style sqlite3 takes;
    rewritten to psycopg's `%(name)s` once). Parameters listed in `json_params` are stored
    as JSON text (None stays SQL NULL), and result columns listed (by position) in
    `json_columns` are decoded from it on SQLite; PostgreSQL's driver decodes JSON columns
    itself."""

    def __init__(self, sql: str, *, json_params: Iterable[str] = (), json_columns: Iterable[int] = ()):
        self.sqlite = sql
        self.postgresql = _NAMED.sub(r"%(\1)s", sql.replace("%", "%%"))
        self.json_params = tuple(json_params)
        self.json_columns = tuple(json_columns)

    def _run(self, tx: Transaction, params: dict[str, Any]):
        for name in self.json_params:
            if params[name] is not None:
                params[name] = json.dumps(params[name])
        sql = self.sqlite if tx.sqlite else self.postgresql
        cursor = tx.connection.cursor()
        try:
            cursor.execute(sql, params)
        except tx.dialect.dbapi.Error as exc:
            cursor.close()
            raise DBAPIError.instance(sql, params, exc, tx.dialect.dbapi.Error) from exc
        return cursor

    def _decode(self, tx: Transaction, row: tuple | None) -> tuple | None:
        if row is None or not tx.sqlite or not self.json_columns:
            return row
        row = list(row)
        for i in self.json_columns:
            if row[i] is not None:
                row[i] = json.loads(row[i])
        return tuple(row)

    def first(self, tx: Transaction, **params: Any) -> tuple | None:
        cursor = self._run(tx, params)
        try:
            return self._decode(tx, cursor.fetchone())
        finally:
            cursor.close()

    def all(self, tx: Transaction, **params: Any) -> list[tuple]:
        cursor = self._run(tx, params)
        try:
            return [self._decode(tx, row) for row in cursor.fetchall()]
        finally:
            cursor.close()

    def scalar(self, tx: Transaction, **params: Any) -> Any:
        row = self.first(tx, **params)
        return None if row is None else row[0]

    def rowcount(self, tx: Transaction, **params: Any) -> int:
        """Run an UPDATE or DELETE; the number of rows it changed."""
        cursor = self._run(tx, params)
        try:
            return cursor.rowcount
        finally:
            cursor.close()
