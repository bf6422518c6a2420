"""The database engine: pooled server connections that died are replaced unseen; engines
opening a new SQLite file at once all connect; planner statistics are fresh after an
import; a lease commits without waiting for the disk."""

from __future__ import annotations

import pytest

from align.formats import Candidate, PromptRecord
from annotation import services
from tests.annotation.conftest import PASSWORD, PG_URL, _reset_postgres


@pytest.mark.skipif(not PG_URL, reason="ALIGN_TEST_DATABASE_URL not set (source .ci/services.sh to run on PostgreSQL)")
def test_dead_pooled_connections_are_replaced(monkeypatch):
    from sqlalchemy import create_engine, text

    from annotation import pg_engine, services
    from annotation.db import open_db

    _reset_postgres(PG_URL)
    monkeypatch.setattr(pg_engine, "PING_AFTER_IDLE_S", 0.0)  # every checkout counts as idle
    sm = open_db(PG_URL)
    with sm() as db:
        services.create_user(db, "alive", PASSWORD)  # leaves connections in the pool
    killer = create_engine(PG_URL)
    with killer.begin() as conn:  # what a server restart does to the pool
        killed = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
    killer.dispose()
    assert killed >= 1
    with sm() as db:
        assert services.get_user(db, "alive").username == "alive"
        token = services.issue_api_token(db, services.get_user(db, "alive"))
        assert services.user_for_token(db, token).username == "alive"  # the raw hot path too
    sm.kw["bind"].dispose()


def test_engines_opening_a_new_sqlite_file_at_once_all_connect_in_wal_mode(tmp_path):
    """Server workers and a CLI import open a new database at the same moment: each
    connection switches it to WAL or finds it switched, none fails with "database is
    locked" (SQLite does not wait on that switch by itself; 4 at once, about 1 in 8 new
    files failed before). 40 new files, 4 engines each."""
    import threading

    from sqlalchemy import text

    from annotation.db import make_engine

    errors: list[str] = []
    modes: list[str] = []
    for n in range(40):
        engines = [make_engine(f"sqlite:///{tmp_path / f'new-{n}.db'}") for _ in range(4)]
        barrier = threading.Barrier(len(engines))

        def open_one(engine, barrier: threading.Barrier) -> None:
            barrier.wait()
            try:
                with engine.connect() as conn:
                    modes.append(conn.execute(text("PRAGMA journal_mode")).scalar())
            except Exception as exc:  # reported by the assertion below
                errors.append(repr(exc))

        threads = [threading.Thread(target=open_one, args=(e, barrier)) for e in engines]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for e in engines:
            e.dispose()
    assert errors == []
    assert modes == ["wal"] * 160


def test_wal_is_checkpointed_in_the_background(tmp_path):
    """A server's SQLite connections leave checkpoints to the WalCheckpointer thread:
    committed pages stay in the WAL until it copies them into the database file."""
    import time

    from annotation.db import WalCheckpointer, make_engine

    url = f"sqlite:///{tmp_path / 'wal.db'}"
    engine = make_engine(url, background_checkpoints=True)
    _fill_wal(engine, 20)  # 2,000 pages of commits: past SQLite's own checkpoint threshold of 1,000
    db_file = tmp_path / "wal.db"
    before = db_file.stat().st_size
    assert before < 100_000  # the precondition: the rows are still only in the WAL
    checkpointer = WalCheckpointer(url, interval_s=0.05).start()
    try:
        deadline = time.time() + 10
        while db_file.stat().st_size < 5_000_000 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        checkpointer.stop()
    assert db_file.stat().st_size >= 5_000_000  # 8,000 rows of 1 kB copied into the database file
    engine.dispose()


def _fill_wal(engine, batches: int) -> None:
    """About 400 kB of commits per batch, left in the WAL (the engine checkpoints nothing)."""
    from sqlalchemy import text

    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS t (x TEXT)"))
    for _ in range(batches):
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (:x)"), [{"x": "y" * 1000} for _ in range(400)])


def test_a_wal_past_its_limit_is_cut_even_while_readers_come_and_go(tmp_path):
    """PASSIVE checkpoints copy pages but never start the WAL over while a reader is on an
    older snapshot, so under load it grows; past the limit the checkpointer cuts it
    (TRUNCATE). A reader that stays keeps it from doing so: that round gives up at once
    rather than stall the writers, and a later one cuts it."""
    from annotation.db import WalCheckpointer, make_engine

    url = f"sqlite:///{tmp_path / 'wal.db'}"
    engine = make_engine(url, background_checkpoints=True)
    _fill_wal(engine, 10)
    checkpointer = WalCheckpointer(url, wal_limit_bytes=1 << 20)
    try:
        assert checkpointer.wal_bytes() > 2 << 20  # the precondition: a WAL past the limit
        reader = engine.raw_connection()  # a reader on the current snapshot, left open
        reader.dbapi_connection.begin(write=False)
        reader.dbapi_connection.execute("SELECT count(*) FROM t").fetchall()
        _fill_wal(engine, 2)  # ... while writers go on
        assert checkpointer.checkpoint() == "BUSY" and checkpointer.wal_bytes() > 1 << 20
        reader.rollback()
        reader.close()
        assert checkpointer.checkpoint() == "TRUNCATE" and checkpointer.wal_bytes() == 0
        _fill_wal(engine, 1)  # under the limit: PASSIVE only, the file is left as it is
        assert checkpointer.checkpoint() == "PASSIVE" and 0 < checkpointer.wal_bytes() < 1 << 20
    finally:
        checkpointer.close()
        engine.dispose()


@pytest.mark.skipif(not PG_URL, reason="ALIGN_TEST_DATABASE_URL not set (source .ci/services.sh to run on PostgreSQL)")
def test_right_after_an_import_the_queue_read_stops_after_a_few_rows():
    """Next-task reads the head of the queue by walking its index. Without statistics
    (autovacuum has not looked at the new rows yet) PostgreSQL plans a sort of the whole
    project instead, on every request; the import refreshes them."""
    from sqlalchemy import text

    from align.formats import Candidate, PromptRecord
    from annotation import services
    from annotation.db import open_db
    from annotation.services.leasing import _QUEUE_SQL

    _reset_postgres(PG_URL)
    sm = open_db(PG_URL)
    with sm() as db:
        p = services.create_project(db, "q", k=2, annotators_per_prompt=1)
        records = [PromptRecord(f"prompt {i}", f"s{i}", [Candidate("a", "m"), Candidate("b", "m")]) for i in range(3000)]
        services.add_prompts(db, p, records)
        plan = db.execute(text("EXPLAIN " + _QUEUE_SQL), {"project": p.id, "per_prompt": 1, "user": 1}).scalars().all()
    sm.kw["bind"].dispose()
    assert not any("Sort" in line for line in plan), "\n".join(plan)
    assert any("Index Scan using ix_prompts_queue" in line for line in plan), "\n".join(plan)


def test_a_lease_commits_without_waiting_for_the_disk_and_a_ranking_waits(db_url, monkeypatch):
    """A lease costs nothing to lose in a power cut (the annotator reloads), so its commit
    does not wait for the disk: SQLite commits it with synchronous=NORMAL, PostgreSQL with
    synchronous_commit off. The ranking that follows is committed durably, and its flush
    of the log covers the lease before it."""
    from sqlalchemy import event

    from annotation.db import open_db

    sm = open_db(db_url)
    engine = sm.kw["bind"]
    engine.dispose()  # every connection from here on is traced
    executed = []  # (statement, the durability it committed with)
    tracing = False
    if db_url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def trace(dbapi_conn, _record):
            # what the engine's own connect hook set, before this one ran
            level = {"now": {2: "FULL", 1: "NORMAL"}[dbapi_conn.execute("PRAGMA synchronous").fetchone()[0]]}

            def seen(sql):
                sql = sql.strip()
                if sql.startswith("PRAGMA synchronous="):
                    level["now"] = sql.split("=")[1]
                elif sql.startswith("INSERT INTO"):
                    executed.append((sql, level["now"]))
            dbapi_conn.set_trace_callback(seen)
    else:
        import psycopg

        run = psycopg.Cursor.execute

        def execute(cursor, query, params=None, **kw):
            result = run(cursor, query, params, **kw)
            if isinstance(query, str) and ("INTO assignments" in query or "INTO rankings" in query) and tracing:
                # Replayed in a transaction that is rolled back: what synchronous_commit
                # the statement leaves in force for its commit.
                with psycopg.connect(PG_URL.replace("+psycopg", "")) as replay:
                    run(replay.cursor(), query, params)
                    executed.append((query, replay.execute("SHOW synchronous_commit").fetchone()[0]))
                    replay.rollback()
            return result
        monkeypatch.setattr(psycopg.Cursor, "execute", execute)

    with sm() as db:
        p = services.create_project(db, "durability", k=3, annotators_per_prompt=1)
        services.add_prompts(db, p, [PromptRecord("q", "q", [Candidate(f"r{j}") for j in range(3)])])
        user = services.create_user(db, "dur", None, "annotator")
        executed.clear()
        tracing = True
        task = services.next_task(db, user, p)
        services.submit_ranking(db, user, task.assignment_id, [[c.id] for c in task.candidates])
    engine.dispose()
    durability = {("lease" if "INTO assignments" in sql else "ranking" if "INTO rankings" in sql else sql): level
                  for sql, level in executed}
    lazy, durable = ("NORMAL", "FULL") if db_url.startswith("sqlite") else ("off", "on")
    assert durability == {"lease": lazy, "ranking": durable}


def test_a_transaction_that_need_not_be_durable_leaves_the_next_one_durable(db_url):
    from annotation import raw_sql
    from annotation.db import open_db

    sm = open_db(db_url)
    sqlite = db_url.startswith("sqlite")
    level = raw_sql.Sql("PRAGMA synchronous" if sqlite else "SHOW synchronous_commit")
    with sm() as db:
        raw_sql.hold_connection(db)  # one pooled connection for all three
        seen = []
        for durable in (True, False, True):
            with raw_sql.transaction(db, write=True, durable=durable) as tx:
                seen.append(level.scalar(tx))
        raw_sql.release_connection(db)
    sm.kw["bind"].dispose()
    assert seen == ([2, 1, 2] if sqlite else ["on", "off", "on"])  # 2 = FULL, 1 = NORMAL


@pytest.mark.skipif(not PG_URL, reason="ALIGN_TEST_DATABASE_URL not set (source .ci/services.sh to run on PostgreSQL)")
def test_a_held_connection_leaves_autocommit_for_a_transaction_and_goes_back_without_it():
    """A request's held connection stays in autocommit between `autocommit` blocks; a
    `transaction` after one still rolls back as a whole, and the pool gets the connection
    back out of autocommit (the ORM's transactions run on it next)."""
    from sqlalchemy import select

    from annotation import raw_sql
    from annotation.db import open_db
    from annotation.models import User
    from tests.annotation.conftest import _reset_postgres

    _reset_postgres(PG_URL)
    sm = open_db(PG_URL)
    insert = raw_sql.Sql("INSERT INTO users (username, role, active, created_at) VALUES (:name, 'annotator', true, 0)")
    with sm() as db:
        raw_sql.hold_connection(db)
        with raw_sql.autocommit(db) as tx:
            insert.rowcount(tx, name="kept")  # committed by itself
        connection = db.info["align.raw_connection"].dbapi_connection
        with pytest.raises(RuntimeError, match="undo"):
            with raw_sql.transaction(db, write=True) as tx:
                insert.rowcount(tx, name="undone")
                raise RuntimeError("undo")
        with raw_sql.autocommit(db) as tx:
            assert connection.autocommit
        raw_sql.release_connection(db)
        assert not connection.autocommit
        assert list(db.scalars(select(User.username))) == ["kept"]
    sm.kw["bind"].dispose()


def test_a_transient_row_reads_as_a_constructed_one_in_a_fresh_process():
    """`Base.transient` (rows of hand-written SQL) holds the same values as the constructor,
    columns not given read None, and it is no session's; in a fresh interpreter too, where
    the mappers are not configured yet."""
    import subprocess
    import sys

    code = """
from sqlalchemy import inspect
from annotation.models import RankingRow
columns = dict(id=7, project_id=1, prompt_id=2, user_id=3, assignment_id=4, revision=1, order=[[5], [6, 8]],
               all_bad=False, skipped=False, skip_reason=None, rationale="r", time_spent_ms=9, created_at=1.5)
fast = RankingRow.transient(**columns)  # read before anything else configures the mappers
assert [getattr(fast, k) for k in columns] == list(columns.values()) and RankingRow.transient(id=1).rationale is None
slow = RankingRow(**columns)
assert all(getattr(slow, k) == v for k, v in columns.items()) and inspect(fast).transient
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.mark.skipif(not PG_URL, reason="ALIGN_TEST_DATABASE_URL not set (source .ci/services.sh to run on PostgreSQL)")
def test_a_postgresql_lock_wait_is_bounded_by_lock_timeout():
    """A table locked by someone else (a DBA's LOCK TABLE, CREATE INDEX, VACUUM FULL) held every
    request behind it as long as the lock lasted; the wait now ends after lock_timeout_s with
    PostgreSQL's LockNotAvailable, which the server answers 503."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    from annotation.db import make_engine, migrate

    _reset_postgres(PG_URL)
    engine = make_engine(PG_URL, lock_timeout_s=0.2, pool_size=2)
    migrate(engine)
    holder = create_engine(PG_URL)
    with holder.begin() as locked:
        locked.execute(text("LOCK TABLE assignments IN ACCESS EXCLUSIVE MODE"))
        with engine.connect() as conn, pytest.raises(OperationalError) as refused:
            conn.execute(text("SET statement_timeout = 5000"))  # without lock_timeout: 57014 after 5 s, not a hang
            conn.execute(text("SELECT count(*) FROM assignments"))
    assert getattr(refused.value.orig, "sqlstate", None) == "55P03"  # lock_not_available
    with engine.connect() as conn:  # the lock gone, the same pooled connection reads
        assert conn.execute(text("SELECT count(*) FROM assignments")).scalar() == 0
    holder.dispose()
    engine.dispose()


@pytest.mark.skipif(not PG_URL, reason="ALIGN_TEST_DATABASE_URL not set (source .ci/services.sh to run on PostgreSQL)")
def test_a_start_waits_for_another_process_migration_past_lock_timeout():
    """The server's connections bound lock waits, but a worker starting while another process
    migrates waits for it (and then finds nothing to do) instead of failing on lock_timeout."""
    import threading

    from sqlalchemy import create_engine, text

    from annotation.db import _MIGRATION_LOCK_KEY, make_engine, migrate

    _reset_postgres(PG_URL)
    holder = create_engine(PG_URL)
    conn = holder.connect()
    tx = conn.begin()
    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})  # another's migration
    threading.Timer(0.6, tx.commit).start()
    engine = make_engine(PG_URL, lock_timeout_s=0.1, pool_size=2)
    migrate(engine)
    engine.dispose()
    conn.close()
    holder.dispose()
