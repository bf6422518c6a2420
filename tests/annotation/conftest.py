"""Fixtures for the annotation tests: an app on a temporary SQLite file (and on PostgreSQL
when ALIGN_TEST_DATABASE_URL is set), users with tokens, and a real server process."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from annotation.devserver import PASSWORD, REPO, ServerProcess, free_port, seed_database  # noqa: F401

PG_URL = os.environ.get("ALIGN_TEST_DATABASE_URL")


def _reset_postgres(url: str) -> None:
    from sqlalchemy import create_engine

    from annotation.models import Base

    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS align_meta")
    engine.dispose()


@pytest.fixture(autouse=True)
def _cheap_password_hashing(monkeypatch):
    """argon2id (salted, verified for real) at its smallest cost in this process. The production cost
    (the library's defaults: 3 passes over 64 MiB) is about 0.2 s a hash on a 2-core machine, and these
    tests hash and verify a password for every user and sign-in they make; none of them is about that
    cost, and a hash records its own parameters, so hashes made either way verify either way. A server
    process a test starts hashes at the production cost."""
    from argon2 import PasswordHasher

    from annotation import security

    monkeypatch.setattr(security, "_hasher", PasswordHasher(time_cost=1, memory_cost=8, parallelism=1))


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    if not PG_URL:
        pytest.skip("ALIGN_TEST_DATABASE_URL not set (source .ci/services.sh to run on PostgreSQL)")
    _reset_postgres(PG_URL)
    return PG_URL


@dataclass
class Env:
    client: object  # fastapi.testclient.TestClient
    sessionmaker: object
    admin_token: str
    team: list = field(default_factory=list)  # annotators made members of every project

    def db(self):
        return self.sessionmaker()

    def headers(self, token: str) -> dict:
        return {"Authorization": f"Bearer {token}"}

    def annotator(self, name: str, member_of_all: bool = True) -> str:
        """Create an annotator (a member of every project so far, and of those `project`
        creates later) and return an API token for it."""
        from annotation import services

        with self.db() as db:
            user = services.create_user(db, name, PASSWORD)
            if member_of_all:
                self.team.append(name)
                for p in services.list_projects(db):
                    services.add_member(db, p, user)
            return services.issue_api_token(db, user)

    def project(self, name="p", n_prompts=3, k=3, annotators=1, **kw) -> None:
        from align.formats import Candidate, PromptRecord
        from annotation import services

        with self.db() as db:
            p = services.create_project(db, name, k=k, annotators_per_prompt=annotators, **kw)
            services.add_prompts(
                db, p,
                [PromptRecord(f"prompt {i}?", f"q{i}", [Candidate(f"answer {i}.{j}", "m") for j in range(k)]) for i in range(n_prompts)],
            )
            for name in self.team:
                services.add_member(db, p, services.get_user(db, name))

    def counts(self) -> dict:
        """Row counts that must not move when a request is refused."""
        from sqlalchemy import func, select

        from annotation.models import Assignment, Prompt, RankingRow

        with self.db() as db:
            return {
                "rankings": db.scalar(select(func.count()).select_from(RankingRow)),
                "done": db.scalar(select(func.count()).select_from(Assignment).where(Assignment.status == "done")),
                "slots": db.scalar(select(func.coalesce(func.sum(Prompt.slots_taken), 0))),
            }


@pytest.fixture
def env(db_url) -> Env:
    from fastapi.testclient import TestClient

    from annotation import services
    from annotation.app import create_app
    from annotation.settings import Settings

    app = create_app(Settings(db_url=db_url, max_body_bytes=64 * 1024))
    with app.state.sessionmaker() as db:
        admin = services.create_user(db, "admin", PASSWORD, "admin")
        token = services.issue_api_token(db, admin)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield Env(client, app.state.sessionmaker, token)
    app.state.engine.dispose()
