"""The hot path's hand-written INSERTs into rankings and assignments (`annotation.raw_sql`)
are built from the models: every column the model has is in each of them, and what the
hot path hands back as a stored row holds every column too."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import Column, Integer, MetaData, select

from align.formats import Candidate, PromptRecord
from annotation import services
from annotation.models import Assignment, RankingRow
from annotation.raw_sql import Sql, insert_into
from annotation.services import leasing, rankings

_INSERT = re.compile(r"INSERT INTO (\w+) \(([^)]*)\)")
_CALLER = "SELECT id, username, role FROM users WHERE id = :user"


def _statements() -> list[str]:
    """Every statement of the hot-path modules, in both dialects' forms (a statement built
    around its caller with a caller of its own)."""
    texts = []
    for module in (leasing, rankings):
        for value in vars(module).values():
            if isinstance(value, Sql):
                texts += [value.sqlite, value.postgresql]
        for build in (leasing._next_task_in_one_statement, rankings._submit_in_one_statement):
            texts.append(build(_CALLER).postgresql)
    return texts


def _model_columns(table) -> list[str]:
    return [c.name for c in table.columns if c is not table.autoincrement_column]


def test_every_hot_path_insert_names_every_column_of_its_model():
    tables = {t.name: t for t in (RankingRow.__table__, Assignment.__table__)}
    found: dict[str, int] = {}
    for text in _statements():
        for table, columns in _INSERT.findall(text):
            if table in tables:
                found[table] = found.get(table, 0) + 1
                assert [c.strip().strip('"') for c in columns.split(",")] == _model_columns(tables[table]), text
    # rankings: a first ranking (SQLite, PostgreSQL), a skip; assignments: a lease, two PostgreSQL claims
    assert found["rankings"] >= 3 * 2 and found["assignments"] >= 3


def test_an_insert_missing_a_model_column_is_refused_where_it_is_built():
    grown = RankingRow.__table__.to_metadata(MetaData())
    grown.append_column(Column("added_later", Integer))
    values = {name: ":" + name for name in _model_columns(RankingRow.__table__)}
    insert_into(RankingRow.__table__, **values)  # what the model has today: built
    with pytest.raises(ValueError, match=r"missing \['added_later'\]"):
        insert_into(grown, **values)
    with pytest.raises(ValueError, match=r"not in the model \['typo'\]"):
        insert_into(RankingRow.__table__, typo=":typo", **values)


def test_rows_the_hot_path_returns_hold_every_column_as_stored(db_url):
    """The rows submit_ranking and skip_task hand back (built without a read) are the rows
    stored, column for column."""
    from annotation.db import open_db

    sm = open_db(db_url)
    with sm() as db:
        p = services.create_project(db, "p", k=2, annotators_per_prompt=1)
        services.add_prompts(db, p, [PromptRecord(f"q{i}", f"id{i}", [Candidate("a"), Candidate("b")])
                                     for i in range(2)])
        user = services.create_user(db, "ann", None, "annotator")
        task = services.next_task(db, user, p)
        ids = [c.id for c in task.candidates]
        ranked = services.submit_ranking(db, user, task.assignment_id, [[ids[0]], [ids[1]]], rationale="why",
                                         time_spent_ms=5)
        skipped = services.skip_task(db, user, services.next_task(db, user, p).assignment_id, "unsure")
        columns = _model_columns(RankingRow.__table__) + ["id"]
        for returned in (ranked, skipped):
            assert set(columns) <= set(vars(returned))
            stored = db.scalar(select(RankingRow).where(RankingRow.id == returned.id))
            assert {c: vars(returned)[c] for c in columns} == {c: getattr(stored, c) for c in columns}
        lease = db.get(Assignment, skipped.assignment_id)
        assert lease.status == "skipped" and lease.completed_at is not None
    sm.kw["bind"].dispose()

