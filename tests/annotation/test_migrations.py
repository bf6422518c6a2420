"""A database made by an older align, with data in it, is brought up to the current
schema, data kept; processes that migrate at the same moment do so one after the other."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import Column, Index, MetaData, Table, UniqueConstraint, inspect, text

from annotation.models import Base

# What each schema version lacked, against the current models: (columns it did not have,
# tables it did not have, the leasing queue index's columns, whether the one-live-lease
# index existed).
_QUEUE_V1 = ["project_id", "done_count", "slots_taken"]
_QUEUE_NOW = ["project_id", "done_count", "slots_taken", "id"]
_V5 = {"projects": {"rank_top"}, "rankings": {"below"}}  # top-m, v6
_V4 = {"users": {"password_change_required"}, **_V5}  # v5
SCHEMAS = {
    1: ({"api_tokens": {"expires_at"}, "invites": {"project_id"}, **_V4}, {"login_failures", "project_members"},
        _QUEUE_V1, False),
    2: (_V4, set(), _QUEUE_V1, False),
    3: (_V4, set(), _QUEUE_NOW, False),
    4: (_V4, set(), _QUEUE_NOW, True),
    5: (_V5, set(), _QUEUE_NOW, True),
}


def metadata_at(version: int) -> MetaData:
    """The schema of an earlier version, built from the current models less what that
    version lacked."""
    dropped_columns, missing_tables, queue_columns, live_index = SCHEMAS[version]
    md = MetaData()
    for table in Base.metadata.sorted_tables:
        if table.name in missing_tables:
            continue
        columns: list[Column] = [c._copy() for c in table.columns if c.name not in dropped_columns.get(table.name, ())]
        extra = [UniqueConstraint(*[c.name for c in uc.columns]) for uc in table.constraints
                 if isinstance(uc, UniqueConstraint) and len(uc.columns) > 1]
        t = Table(table.name, md, *columns, *extra)
        for index in table.indexes:
            names = [c.name for c in index.columns]
            if len(names) == 1 and t.c[names[0]].index:  # made by the column copy itself
                continue
            if index.name == "ux_assignments_live" and not live_index:
                continue
            if index.name == "ix_prompts_queue":
                names = queue_columns
            Index(index.name, *[t.c[n] for n in names], unique=index.unique, **index.dialect_kwargs)
    return md


def _fill(engine, version: int, created: float) -> None:
    """A user with a token, a project with two prompts, a ranking, and (as two tabs could
    make before v4) two live leases of one annotator in the project."""
    from annotation.security import hash_token

    with engine.begin() as conn:
        sql = lambda statement, **p: conn.execute(text(statement), p)  # noqa: E731
        sql("INSERT INTO align_meta (key, value) VALUES ('schema_version', :v)", v=str(version))
        sql("INSERT INTO users (id, username, password_hash, role, active, created_at) "
            "VALUES (1, 'old', NULL, 'annotator', true, :t)", t=created)
        sql("INSERT INTO api_tokens (id, user_id, token_hash, created_at) VALUES (1, 1, :h, :t)",
            h=hash_token("old-token"), t=created)
        if version >= 2:  # v2 tokens carry their expiry
            sql("UPDATE api_tokens SET expires_at = :e", e=created + 3600 * 24 * 30)
        sql("INSERT INTO projects (id, name, guidelines, k, annotators_per_prompt, lease_seconds, created_at) "
            "VALUES (1, 'old', '', 2, 2, 600, :t)", t=created)
        for pid in (1, 2, 3):
            sql("INSERT INTO prompts (id, project_id, source_id, content, n_candidates, slots_taken, done_count, created_at) "
                "VALUES (:id, 1, :s, '\"q\"', 2, :slots, :done, :t)", id=pid, s=f"s{pid}", t=created,
                slots=1 if pid < 3 or version < 4 else 0, done=1 if pid == 1 else 0)
            for pos in (0, 1):
                sql("INSERT INTO candidates (id, prompt_id, position, text, model, sampling, source_id) "
                    "VALUES (:id, :p, :pos, :txt, 'm', '{}', NULL)", id=2 * pid + pos - 1, p=pid, pos=pos, txt=f"c{pid}{pos}")
        statuses = {1: "done", 2: "leased", 3: "leased" if version < 4 else "skipped"}
        for pid, status in statuses.items():
            sql("INSERT INTO assignments (id, project_id, prompt_id, user_id, status, candidate_order, leased_until, "
                "created_at, completed_at) VALUES (:id, 1, :p, 1, :st, :o, :until, :t, NULL)",
                id=pid, p=pid, st=status, o=f"[{2 * pid - 1}, {2 * pid}]", until=time.time() + 600, t=created)
        sql("INSERT INTO rankings (id, project_id, prompt_id, user_id, assignment_id, revision, \"order\", all_bad, "
            "skipped, skip_reason, rationale, time_spent_ms, created_at) "
            "VALUES (1, 1, 1, 1, 1, 1, '[[2], [1]]', false, false, NULL, 'why', 5, :t)", t=created)


@pytest.mark.parametrize("version", sorted(SCHEMAS))
def test_an_earlier_database_with_data_migrates_to_current_schema(db_url, version):
    from annotation import services
    from annotation.db import SCHEMA_VERSION, make_engine, make_sessionmaker, migrate
    from annotation.models import Assignment, Prompt
    from annotation.settings import DEFAULT_API_TOKEN_TTL_S

    engine = make_engine(db_url)
    metadata_at(version).create_all(engine)
    created = time.time() - 3600
    _fill(engine, version, created)
    if version == 1:
        assert "expires_at" not in {c["name"] for c in inspect(engine).get_columns("api_tokens")}  # the precondition

    migrate(engine)

    insp = inspect(engine)
    assert "expires_at" in {c["name"] for c in insp.get_columns("api_tokens")}
    assert "project_id" in {c["name"] for c in insp.get_columns("invites")}
    assert "password_change_required" in {c["name"] for c in insp.get_columns("users")}
    assert "rank_top" in {c["name"] for c in insp.get_columns("projects")}
    assert "below" in {c["name"] for c in insp.get_columns("rankings")}
    assert {"login_failures", "project_members"} <= set(insp.get_table_names())
    indexes = {i["name"]: i for i in insp.get_indexes("prompts") + insp.get_indexes("assignments")}
    assert indexes["ix_prompts_queue"]["column_names"] == _QUEUE_NOW
    assert indexes["ux_assignments_live"]["unique"]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM align_meta WHERE key = 'schema_version'")).scalar() == str(SCHEMA_VERSION)
        expires = conn.execute(text("SELECT expires_at FROM api_tokens WHERE id = 1")).scalar()
    if version == 1:
        assert abs(expires - (created + DEFAULT_API_TOKEN_TTL_S)) < 1e-3  # old tokens get the default lifetime
    with make_sessionmaker(engine)() as db:
        assert services.user_for_token(db, "old-token").username == "old"  # the old token still signs its user in
        project = services.get_project(db, "old")
        (ranking,) = services.export_rankings(db, project)
        assert ranking.ranks == [1, 0] and ranking.meta["rationale"] == "why"  # the stored ranking, as it was
        assert ranking.ranked is None and project.rank_top is None  # a full ranking, of a full-ranking project
        # The second of two live leases (which only a database before v4 can hold) is
        # expired and its slot given back.
        two_live = version < 4
        assert {a.id: a.status for a in db.query(Assignment)} == {1: "done", 2: "leased", 3: "expired" if two_live else "skipped"}
        assert {p.id: p.slots_taken for p in db.query(Prompt)} == {1: 1, 2: 1, 3: 0}
        assert services.get_user(db, "old").password_change_required is False  # until the next sign-in
        user = services.get_user(db, "old")
        assert services.next_task(db, user, project).assignment_id == 2  # the live lease, shown again
        if version == 1:  # every project was every annotator's: they stay members of each
            assert [u.username for u in services.members(db, project)] == ["old"]
    migrate(engine)  # a second start changes nothing
    engine.dispose()


@pytest.mark.parametrize("version", [0, 1])
def test_processes_migrating_at_once_take_turns(db_url, version):
    """Four engines (as server workers and a CLI import would) migrate one database at the
    same moment, a new one (0) or a version-1 one: each returns without error and the
    schema is migrated once."""
    from annotation.db import SCHEMA_VERSION, make_engine, migrate

    if version:
        engine = make_engine(db_url)
        metadata_at(version).create_all(engine)
        _fill(engine, version, time.time())
        engine.dispose()
    engines = [make_engine(db_url) for _ in range(4)]
    barrier = threading.Barrier(len(engines))
    errors: list[str] = []

    def start(engine) -> None:
        barrier.wait()
        try:
            migrate(engine)
        except Exception as exc:  # reported by the assertion below
            errors.append(repr(exc))

    threads = [threading.Thread(target=start, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with engines[0].connect() as conn:
        assert conn.execute(text("SELECT value FROM align_meta WHERE key = 'schema_version'")).scalar() == str(SCHEMA_VERSION)
        if version:
            assert conn.execute(text("SELECT status FROM assignments ORDER BY id")).scalars().all() == ["done", "leased", "expired"]
    for e in engines:
        e.dispose()


def test_a_database_that_cannot_be_opened_is_one_clear_error(tmp_path):
    from align.errors import UserError
    from annotation.db import make_engine, migrate

    (tmp_path / "a-directory").mkdir()
    with pytest.raises(UserError, match="cannot open database"):
        migrate(make_engine(f"sqlite:///{tmp_path / 'a-directory'}"))
