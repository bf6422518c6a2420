"""The database engine: pooled server connections that died are replaced unseen; planner
statistics are fresh after an import."""

from __future__ import annotations

import pytest

from tests.annotation.conftest import PASSWORD, PG_URL, _reset_postgres


@pytest.mark.skipif(not PG_URL, reason="ALIGN_TEST_DATABASE_URL not set (source .ci/services.sh to run on PostgreSQL)")
def test_dead_pooled_connections_are_replaced(monkeypatch):
    from sqlalchemy import create_engine, text

    from annotation import db as annotation_db
    from annotation import services
    from annotation.db import open_db

    _reset_postgres(PG_URL)
    monkeypatch.setattr(annotation_db, "PING_AFTER_IDLE_S", 0.0)  # every checkout counts as idle
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


def test_wal_is_checkpointed_in_the_background(tmp_path):
    """A server's SQLite connections leave checkpoints to the WalCheckpointer thread:
    committed pages stay in the WAL until it copies them into the database file."""
    import time

    from sqlalchemy import text

    from annotation.db import WalCheckpointer, make_engine

    url = f"sqlite:///{tmp_path / 'wal.db'}"
    engine = make_engine(url, background_checkpoints=True)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (x TEXT)"))
    for _ in range(20):  # 2,000 pages of commits: past SQLite's own checkpoint threshold of 1,000
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (:x)"), [{"x": "y" * 1000} for _ in range(400)])
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
