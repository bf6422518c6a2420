"""Engine, sessions and schema migration for the annotation app."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from align.errors import UserError
from annotation.db_guard import creating_tables, refuse_foreign, refuse_foreign_sqlite_file
from annotation.db_url import masked, sqlite_file
from annotation.models import Base, Meta
from annotation.pg_engine import postgresql_engine
from annotation.raw_sql import on_postgresql

DEFAULT_DB_FILE = "align-annotation.db"
SCHEMA_VERSION = 6


class DatabaseBusy(UserError):
    """A bounded wait for the database ran out (its writer lock, or a pooled connection):
    the server answers 503 with Retry-After, the CLI one line."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


def _flock_within(fd: int, deadline: float) -> bool:
    """Take an exclusive flock on `fd` by `deadline` (time.monotonic()); False if another
    process still holds it then. A blocking flock cannot be given a timeout, so it is
    tried without blocking, with short sleeps between tries (0.5 ms, growing to 2 ms)."""
    pause = 0.0005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.002)


def _use_wal(cursor: sqlite3.Cursor, timeout_s: float) -> None:
    """Put the database in WAL mode (a no-op once it is), retrying for up to `timeout_s`
    while another connection holds the lock the switch needs.

    The switch reads the file under a shared lock and then upgrades it; when another
    connection is upgrading at the same moment (processes opening a new database at once:
    server workers, a CLI import), SQLite answers "database is locked" at once instead
    of calling the busy handler, which could deadlock there (sqlite3_busy_handler's
    documentation). Having failed, this connection holds no lock, so the other one
    finishes and the next try finds WAL already set."""
    deadline = time.monotonic() + timeout_s
    pause = 0.001
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)


def default_db_url() -> str:
    return f"sqlite:///{Path.cwd() / DEFAULT_DB_FILE}"


def make_engine(url: str, *, background_checkpoints: bool = False, pool_timeout_s: float = 30.0,
                lock_timeout_s: float = 60.0, pool_size: int = 16) -> Engine:
    """An engine for `url`. SQLite gets WAL + synchronous=FULL (a 2xx'd commit survives a
    power cut; only a transaction begun as not durable, a lease's, commits with NORMAL) and
    BEGIN IMMEDIATE, so concurrent writers queue on busy_timeout instead of
    failing when a read transaction upgrades to a write. With `background_checkpoints`
    its connections leave WAL checkpoints to a `WalCheckpointer` (the server's).

    Every wait is bounded: for a pooled connection `pool_timeout_s` (SQLAlchemy's
    TimeoutError after it), for SQLite's writer lock `lock_timeout_s` (DatabaseBusy). The
    server sets both short and answers 503 when they run out; the CLI keeps the long
    defaults (an import may wait for a busy server). PostgreSQL: annotation.pg_engine."""
    if url.startswith("postgres://") or url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    try:
        if url.startswith("sqlite"):
            # SQLite has one writer at a time. Threads of this process queue on a FIFO-ish
            # lock taken at BEGIN and released after COMMIT/ROLLBACK, instead of spinning in
            # SQLite's busy handler, whose sleeps (up to 100 ms each, unfair) gave multi-second
            # p99 latencies under load. Across processes (server workers, CLI imports) the
            # holder of that lock also takes an flock on "<db>.writer-lock", which the kernel
            # queues, so workers of one server do not spin in busy_timeout either. Made at the first write
            # (SQLite has opened the file), never deleted: who holds a deleted one locks another file.
            thread_lock = threading.Lock()
            lock_path = sqlite_file(url)
            lock_fd: int | None = None

            class WriterLock:
                def acquire(self, timeout: float) -> bool:
                    nonlocal lock_fd
                    deadline = time.monotonic() + timeout
                    if not thread_lock.acquire(timeout=timeout):
                        return False
                    if lock_path is not None:
                        try:
                            if lock_fd is None:
                                lock_fd = os.open(lock_path + ".writer-lock", os.O_RDWR | os.O_CREAT, 0o600)
                            taken = _flock_within(lock_fd, deadline)
                        except BaseException:
                            thread_lock.release()
                            raise
                        if not taken:
                            thread_lock.release()
                            return False
                    return True

                def release(self) -> None:
                    if lock_fd is not None:
                        fcntl.flock(lock_fd, fcntl.LOCK_UN)
                    thread_lock.release()

            writer_lock = WriterLock()

            class LockingConnection(sqlite3.Connection):
                holds_lock = False
                synchronous = "FULL"  # what _sqlite_connect sets

                def begin(self, write: bool, durable: bool = True) -> None:
                    """BEGIN a read snapshot (WAL: blocks nobody), or BEGIN IMMEDIATE
                    under the writer lock. A write that is not `durable` commits without
                    waiting for the disk (see `raw_sql.transaction`); every other
                    transaction sets synchronous=FULL back first."""
                    synchronous = "FULL" if durable else "NORMAL"
                    if synchronous != self.synchronous:
                        self.execute(f"PRAGMA synchronous={synchronous}")
                        self.synchronous = synchronous
                    if write and not self.holds_lock:
                        if not writer_lock.acquire(timeout=lock_timeout_s):
                            raise DatabaseBusy(f"the database is busy (its writer lock was held for {lock_timeout_s:g} s); "
                                               "try again in a moment")
                        self.holds_lock = True
                    try:
                        self.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    except BaseException:
                        self._release()
                        raise

                def _release(self):
                    if self.holds_lock:
                        self.holds_lock = False
                        writer_lock.release()

                def commit(self):
                    try:
                        super().commit()
                    finally:
                        self._release()

                def rollback(self):
                    try:
                        super().rollback()
                    finally:
                        self._release()

                def close(self):
                    try:
                        super().close()
                    finally:
                        self._release()

            engine = create_engine(
                url, connect_args={"check_same_thread": False, "timeout": 30, "factory": LockingConnection},
                pool_size=48, max_overflow=16,  # >= the threadpool: no connection churn
                pool_timeout=pool_timeout_s,
            )

            @event.listens_for(engine, "connect")
            def _sqlite_connect(dbapi_conn, _record):
                dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (SQLAlchemy pysqlite recipe)
                cur = dbapi_conn.cursor()
                if ":memory:" not in url and url not in ("sqlite://", "sqlite:///"):
                    _use_wal(cur, lock_timeout_s)
                cur.execute("PRAGMA synchronous=FULL")
                if background_checkpoints:
                    cur.execute("PRAGMA wal_autocheckpoint=0")
                cur.execute("PRAGMA foreign_keys=ON")
                # Writers queue on the writer lock above; SQLite's own wait is bounded alike.
                cur.execute(f"PRAGMA busy_timeout={int(lock_timeout_s * 1000)}")
                cur.close()

            @event.listens_for(engine, "begin")
            def _sqlite_begin(conn):
                read_only = conn.get_execution_options().get("align_read_only", False)
                conn.connection.dbapi_connection.begin(write=not read_only)

        else:
            engine = postgresql_engine(url, pool_size=pool_size, pool_timeout_s=pool_timeout_s,
                                       lock_timeout_s=lock_timeout_s)
    except Exception as exc:  # bad URL, missing driver
        raise UserError(f"cannot use database {masked(url)!r}: {exc}") from None
    return engine


class WalCheckpointer:
    """Checkpoints a SQLite WAL from a thread of its own, every `interval_s`, and keeps the
    WAL file under `wal_limit_bytes`.

    By default the connection whose commit fills the WAL past 1,000 pages copies them
    into the database file and fsyncs it, inside that request: at 100 rankings/s that put
    the open-loop p99 of next-task at 290 ms; checkpointing here, 28 ms. A PASSIVE
    checkpoint waits for no reader or writer, and sqlite3 releases the GIL while it runs.

    PASSIVE alone does not bound the WAL: under sustained load some reader is always on an
    older snapshot, the WAL is never started over, and the file grows. When it is past the
    limit, a TRUNCATE checkpoint follows: it waits for the readers of older snapshots to
    finish (new writers wait meanwhile, so that wait is bounded by `busy_timeout_s`), copies
    every frame, and cuts the file to zero. If readers are still there at the end of the
    wait it gives up and the next round tries again."""

    def __init__(self, url: str, interval_s: float = 0.5, wal_limit_bytes: int = 16 << 20,
                 busy_timeout_s: float = 0.1):
        self.path, self.interval_s = sqlite_file(url), interval_s
        self.wal_limit_bytes, self.busy_timeout_s = wal_limit_bytes, busy_timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None

    def start(self) -> WalCheckpointer:
        if self.path is not None:
            self._thread = threading.Thread(target=self._run, name="wal-checkpointer", daemon=True)
            self._thread.start()
        return self

    def wal_bytes(self) -> int:
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:  # no WAL file (yet)
            return 0

    def checkpoint(self) -> str:
        """One round: "PASSIVE", or "TRUNCATE" when the WAL was past its limit and was cut,
        or "BUSY" when it was past its limit and readers kept it from being cut."""
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                         check_same_thread=False)
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        if self.wal_bytes() <= self.wal_limit_bytes:
            return "PASSIVE"
        busy, _log, _done = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return "BUSY" if busy else "TRUNCATE"

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    self.checkpoint()
                except sqlite3.Error:  # busy or gone: the next round tries again, or stop() ends it
                    pass
        finally:
            self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


# PostgreSQL advisory lock key (any constant: advisory locks are per database) that
# serializes `migrate` across processes, as the writer lock does on SQLite.
_MIGRATION_LOCK_KEY = 0x616C69676E  # "align"


def migrate(engine: Engine) -> None:
    """Create the schema, or bring an older one up to SCHEMA_VERSION.

    Migrations are plain functions keyed by the version they produce; version 1 is the
    initial schema. A database newer than this code is refused rather than touched.

    Processes that start at the same moment (server workers, a CLI import) migrate one
    after the other: everything, create_all included, runs in one transaction that first
    takes the database's migration lock (SQLite: BEGIN IMMEDIATE under the writer lock;
    PostgreSQL: a transaction-level advisory lock, DDL being transactional there). The
    second process then reads the version the first committed and has nothing to do, so
    no error needs to be swallowed; any error is the migration's own and is raised.
    Another application's database is refused before anything is written (annotation.db_guard)."""
    path = sqlite_file(str(engine.url))  # (None: in memory, or a server)
    refuse_foreign_sqlite_file(path)  # before align's first connection switches the file to WAL
    try:
        db = Session(engine)
        if on_postgresql(db):
            # a server's connections bound their lock waits (pg_engine); a start waits for another
            # process's migration, however long it takes
            db.execute(text("SET LOCAL lock_timeout = 0"))
            db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        else:
            db.connection()  # BEGIN IMMEDIATE: the writer lock until the commit below
    except (DatabaseError, OSError) as exc:  # no server; a file that cannot be opened, is no database; no writer lock
        db.close()
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise UserError(f"cannot open database {engine.url.render_as_string(hide_password=True)}: {reason}") from None
    where = path or engine.url.render_as_string(hide_password=True)
    with db, creating_tables(where):
        refuse_foreign(db.connection(), where)  # (no race)
        Base.metadata.create_all(db.connection())
        row = db.get(Meta, "schema_version")
        current = int(row.value) if row else 0
        if current > SCHEMA_VERSION:
            raise UserError(f"database schema v{current} is newer than this align (v{SCHEMA_VERSION}); upgrade align")
        # Each migration checks what it changes, so on a new database (current 0, the
        # current schema from create_all) they change nothing.
        for version in range(max(current, 1) + 1, SCHEMA_VERSION + 1):  # v1: create_all
            MIGRATIONS[version](db)
        if row is None:
            db.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
        elif current != SCHEMA_VERSION:
            row.value = str(SCHEMA_VERSION)
        db.commit()


def _v2(db: Session) -> None:
    """API tokens expire (expires_at); an invite may name its project; projects have members (v1 showed
    every project to every annotator: each becomes a member of each). New tables: create_all above."""
    from sqlalchemy import inspect, text

    from annotation.settings import DEFAULT_API_TOKEN_TTL_S

    conn = db.connection()
    columns = {t: {c["name"] for c in inspect(conn).get_columns(t)} for t in ("api_tokens", "invites")}
    if "expires_at" not in columns["api_tokens"]:
        conn.execute(text("ALTER TABLE api_tokens ADD COLUMN expires_at FLOAT"))
        conn.execute(text("UPDATE api_tokens SET expires_at = created_at + :ttl"), {"ttl": DEFAULT_API_TOKEN_TTL_S})
    if "project_id" not in columns["invites"]:
        conn.execute(text("ALTER TABLE invites ADD COLUMN project_id INTEGER REFERENCES projects(id)"))
    conn.execute(text("INSERT INTO project_members (project_id, user_id, added_at) SELECT p.id, u.id, :now "
                      "FROM projects p CROSS JOIN users u WHERE u.role = 'annotator'"), {"now": time.time()})


def _v3(db: Session) -> None:
    """The leasing queue's index ends with the prompt id (ordered scan, no sort)."""
    conn = db.connection()
    conn.execute(text("DROP INDEX IF EXISTS ix_prompts_queue"))
    conn.execute(text("CREATE INDEX ix_prompts_queue ON prompts (project_id, done_count, slots_taken, id)"))


def _v4(db: Session) -> None:
    """One live lease per annotator and project (the partial unique index
    ux_assignments_live). Two tabs could hold two before it; the later of such leases are
    expired and their slots given back, as a lease that ran out would be, so that the
    index can be built."""
    from sqlalchemy import and_, exists, update
    from sqlalchemy.orm import aliased

    from annotation.models import Assignment, Prompt

    earlier = aliased(Assignment)
    duplicates = db.execute(select(Assignment.id, Assignment.prompt_id).where(
        Assignment.status == "leased",
        exists().where(and_(earlier.user_id == Assignment.user_id, earlier.project_id == Assignment.project_id,
                            earlier.status == "leased", earlier.id < Assignment.id)))).all()
    for lease in duplicates:
        db.execute(update(Assignment).where(Assignment.id == lease.id).values(status="expired"))
        db.execute(update(Prompt).where(Prompt.id == lease.prompt_id).values(slots_taken=Prompt.slots_taken - 1))
    db.connection().execute(text("DROP INDEX IF EXISTS ux_assignments_live"))
    live = next(i for i in Assignment.__table__.indexes if i.name == "ux_assignments_live")
    live.create(db.connection())


def _v5(db: Session) -> None:
    """users.password_change_required: set at sign-in when the password used no longer
    meets the rules (15 characters and a blocklist since v5; 8 before)."""
    conn = db.connection()
    if "password_change_required" not in {c["name"] for c in inspect(conn).get_columns("users")}:
        conn.execute(text("ALTER TABLE users ADD COLUMN password_change_required BOOLEAN NOT NULL DEFAULT FALSE"))


def _v6(db: Session) -> None:
    """Top-m rankings: projects.rank_top (None: rank every candidate) and rankings.below
    (None: a full ranking). Existing rows are full rankings of full-ranking projects."""
    conn = db.connection()
    for table, column, sql_type in (("projects", "rank_top", "INTEGER"), ("rankings", "below", "JSON")):
        if column not in {c["name"] for c in inspect(conn).get_columns(table)}:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}"))


MIGRATIONS: dict = {2: _v2, 3: _v3, 4: _v4, 5: _v5, 6: _v6}  # {version: fn(session)}; v1 = create_all above


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def open_db(url: str | None, *, create: bool = True) -> sessionmaker[Session]:
    """The database at `url`, migrated; without `create` a missing SQLite file is refused (a mistyped --db)."""
    url = url or default_db_url()
    path = sqlite_file(url)
    if not create and path is not None and not os.path.exists(path):
        raise UserError(f"database not found: {path} (check --db)")
    engine = make_engine(url)
    migrate(engine)
    return make_sessionmaker(engine)


def refresh_planner_statistics(db: Session) -> None:
    """PostgreSQL: ANALYZE the prompts and candidates an import just added, and commit.
    Until autovacuum gets there, a minute or more later, the planner takes a freshly
    imported project for a handful of rows and sorts the whole project on every queue
    read: measured 21 ms instead of 0.1 ms per read at 8,000 prompts, and 32 rankings/s
    instead of 218 in the first 20 s of annotation. Not `assignments`: statistics
    taken while it is still empty misled the planner as it filled (5.4 against 2.1 ms of
    PostgreSQL CPU per ranking until autovacuum looked again). SQLite: nothing (its queue
    read does not use them)."""
    if on_postgresql(db):
        # Only the columns the queue read and the candidate lookups filter on: a fraction
        # of the time ANALYZE takes on every column (the prompt text is the widest).
        db.execute(text("ANALYZE prompts (project_id, done_count, slots_taken), candidates (prompt_id)"))
        db.commit()


def begin_read_only(db: Session) -> None:
    """Start a read-only transaction, for code that does not write before its next commit: on SQLite a deferred
    BEGIN that takes no writer lock; on PostgreSQL one snapshot too (REPEATABLE READ, which never fails a reader)."""
    if db.in_transaction():
        db.commit()
    snapshot = {"isolation_level": "REPEATABLE READ"} if on_postgresql(db) else {}
    db.connection(execution_options={"align_read_only": True, **snapshot})


def get_meta(db: Session, key: str) -> str | None:
    row = db.execute(select(Meta).where(Meta.key == key)).scalar_one_or_none()
    return row.value if row else None
