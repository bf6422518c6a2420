"""A database made by an older align is brought up to the current schema, data kept."""

from __future__ import annotations

import time

from sqlalchemy import Column, Index, MetaData, Table, UniqueConstraint, inspect, text

from annotation.models import Base

V1_DROPPED_COLUMNS = {"api_tokens": {"expires_at"}, "invites": {"project_id"}}
V1_MISSING_TABLES = {"login_failures", "project_members"}


def v1_metadata() -> MetaData:
    """The schema of version 1: no token expiry, no invite project, no throttle or member
    tables, and the leasing index without the prompt id."""
    md = MetaData()
    for table in Base.metadata.sorted_tables:
        if table.name in V1_MISSING_TABLES:
            continue
        columns: list[Column] = [c._copy() for c in table.columns if c.name not in V1_DROPPED_COLUMNS.get(table.name, ())]
        extra = [UniqueConstraint(*[c.name for c in uc.columns]) for uc in table.constraints
                 if isinstance(uc, UniqueConstraint) and len(uc.columns) > 1]
        t = Table(table.name, md, *columns, *extra)
        for index in table.indexes:
            names = [c.name for c in index.columns]
            if len(names) == 1 and t.c[names[0]].index:  # made by the column copy itself
                continue
            if index.name == "ix_prompts_queue":
                names = ["project_id", "done_count", "slots_taken"]
            Index(index.name, *[t.c[n] for n in names], unique=index.unique)
    return md


def test_v1_database_migrates_to_current_schema(db_url):
    from annotation import services
    from annotation.db import SCHEMA_VERSION, make_engine, make_sessionmaker, migrate
    from annotation.security import hash_token
    from annotation.settings import DEFAULT_API_TOKEN_TTL_S

    engine = make_engine(db_url)
    v1_metadata().create_all(engine)
    created = time.time() - 3600
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO align_meta (key, value) VALUES ('schema_version', '1')"))
        conn.execute(text("INSERT INTO users (id, username, password_hash, role, active, created_at) "
                          "VALUES (1, 'old', NULL, 'annotator', true, :t)"), {"t": created})
        conn.execute(text("INSERT INTO api_tokens (id, user_id, token_hash, created_at) VALUES (1, 1, :h, :t)"),
                     {"h": hash_token("old-token"), "t": created})
    before = {c["name"] for c in inspect(engine).get_columns("api_tokens")}
    assert "expires_at" not in before  # the precondition: a version-1 table

    migrate(engine)

    insp = inspect(engine)
    assert "expires_at" in {c["name"] for c in insp.get_columns("api_tokens")}
    assert "project_id" in {c["name"] for c in insp.get_columns("invites")}
    assert {"login_failures", "project_members"} <= set(insp.get_table_names())
    queue = next(i for i in insp.get_indexes("prompts") if i["name"] == "ix_prompts_queue")
    assert queue["column_names"] == ["project_id", "done_count", "slots_taken", "id"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM align_meta WHERE key = 'schema_version'")).scalar() == str(SCHEMA_VERSION)
        expires = conn.execute(text("SELECT expires_at FROM api_tokens WHERE id = 1")).scalar()
    assert abs(expires - (created + DEFAULT_API_TOKEN_TTL_S)) < 1e-3  # old tokens get the default lifetime
    with make_sessionmaker(engine)() as db:  # the old token still signs its user in
        assert services.user_for_token(db, "old-token").username == "old"
    migrate(engine)  # a second start changes nothing
    engine.dispose()
