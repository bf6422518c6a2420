"""The database engine: pooled server connections that died are replaced unseen."""

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
