"""PostgreSQL connections for the annotation app: a fixed pool, dead connections replaced before
a request sees them, and lock waits bounded as SQLite's writer lock is."""

from __future__ import annotations

import time

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine


def postgresql_engine(url: str, *, pool_size: int, pool_timeout_s: float, lock_timeout_s: float) -> Engine:
    """An engine holding at most `pool_size` server connections, each of which waits at most
    `lock_timeout_s` for a lock (PostgreSQL's lock_timeout; without it a request waited as long as
    a DBA's `LOCK TABLE`, a `CREATE INDEX` or a `VACUUM FULL` held the table, and every request
    behind it hung). A wait that runs out is LockNotAvailable, which the server answers 503."""
    # At most pool_size connections per process: the server's workers together
    # stay under PostgreSQL's max_connections, past which it refuses the next
    # connection and the request was a 500; past them a request waits
    # pool_timeout_s for one and is a 503. No overflow: SQLAlchemy closes an
    # overflow connection as soon as it is given back, so a burst past the pool
    # opened and closed server connections at its height (each new one costs the
    # server a process and cold caches, tens of ms of CPU), which made it worse.
    # Last in, first out: at an even load the same few connections serve, and when
    # an ANALYZE (autovacuum's, an import's) invalidates the cached plans, only
    # those few plan the hot statements again at once, not every connection of
    # every worker (after such an ANALYZE next-task's p99 over the next 2 s was
    # 21-59 ms against 77-108 ms first in, first out, 200 rankings/s, 2 cores).
    engine = create_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=pool_timeout_s, pool_use_lifo=True)
    lock_timeout_ms = max(1, round(lock_timeout_s * 1000))

    @event.listens_for(engine, "connect")
    def _bound_lock_waits(dbapi_conn, _record):
        cursor = dbapi_conn.cursor()
        cursor.execute(f"SET lock_timeout = {lock_timeout_ms}")  # an int: nothing of a user's in the statement
        cursor.close()
        dbapi_conn.commit()  # a SET in a transaction rolled back would be undone

    _ping_after_idle(engine)
    return engine


PING_AFTER_IDLE_S = 1.0


def open_connections(engine: Engine) -> None:
    """Open every connection of the pool now and leave them in it (PostgreSQL; on SQLite a
    connection costs nothing to open). The server does this before it takes requests.
    Opened on demand, they were opened when load rose: twenty-odd in the first second of
    annotators, a dozen more in a burst, each a new server process with cold caches,
    while next-task waited up to 0.8 s."""
    if engine.dialect.name != "postgresql":
        return
    held = []
    try:
        for _ in range(engine.pool.size()):
            held.append(engine.raw_connection())
    finally:
        for connection in held:
            connection.close()


def _ping_after_idle(engine: Engine) -> None:
    """Check a pooled server connection before use only if it sat idle for a while
    (HikariCP's aliveBypassWindowMs): a connection back from use a moment ago is alive,
    and pinging it on every checkout, as pool_pre_ping does, would add a round trip to
    each of the few short transactions a ranking makes. A dead one (the server
    restarted) is replaced before the request sees it (SQLAlchemy's pessimistic
    disconnect handling)."""
    from sqlalchemy.exc import DisconnectionError

    @event.listens_for(engine, "checkin")
    def _returned(_dbapi_conn, record):
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(dbapi_conn, record, _proxy):
        if time.monotonic() - record.info.get("returned_at", float("-inf")) < PING_AFTER_IDLE_S:
            return
        try:
            cursor = dbapi_conn.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
            dbapi_conn.rollback()
        except engine.dialect.dbapi.Error as exc:
            raise DisconnectionError(f"pooled connection is dead: {exc}") from exc


# SQLSTATE classes of a server that cannot answer for the moment: 08 connection exception, 57P
# operator intervention (admin_shutdown, crash_shutdown, cannot_connect_now: a restart), 53300
# too_many_connections; and 55P03 lock_not_available (lock_timeout ran out).
_UNAVAILABLE_STATES = ("08", "57P", "53300")


def unavailable(exc: BaseException) -> str | None:
    """Why PostgreSQL could not answer a request for the moment (a restart, a connection the server
    dropped, no connection slot left, a lock held past lock_timeout), in words for a 503; None for
    any other error. The client sends it again after Retry-After, as after any 503: a ranking's
    submission is safe to repeat (a second one answers already_ranked, a revision repeated stores
    nothing)."""
    try:
        import psycopg
    except ImportError:  # SQLite only: the driver is not installed
        return None

    orig = getattr(exc, "orig", None)
    if not isinstance(orig, psycopg.OperationalError):
        return None
    state = orig.sqlstate or ""
    if state == "55P03":
        return "a lock held elsewhere (an import, a database administrator's command) outlasted lock_timeout_s"
    if getattr(exc, "connection_invalidated", False) or not state or state.startswith(_UNAVAILABLE_STATES):
        return "the database cannot be reached for the moment (restarting, or out of connections)"
    return None
