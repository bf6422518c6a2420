"""Fixtures for the annotation tests: an app on a temporary SQLite file (and on PostgreSQL
when ALIGN_TEST_DATABASE_URL is set), users with tokens, and a real server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("ALIGN_TEST_DATABASE_URL")
PASSWORD = "correct horse battery"


def _reset_postgres(url: str) -> None:
    from sqlalchemy import create_engine

    from annotation.models import Base

    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS align_meta")
    engine.dispose()


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

    def db(self):
        return self.sessionmaker()

    def headers(self, token: str) -> dict:
        return {"Authorization": f"Bearer {token}"}

    def annotator(self, name: str) -> str:
        """Create an annotator and return an API token for it."""
        from annotation import services

        with self.db() as db:
            user = services.create_user(db, name, PASSWORD)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`align annotate serve` in a child process on 127.0.0.1."""

    def __init__(self, db_url: str, log: Path):
        self.db_url, self.port, self.log = db_url, free_port(), log
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        import httpx

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "align", "annotate", "serve", "--db", self.db_url, "--port", str(self.port),
             "--log-level", "warning"],
            cwd=REPO, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not come up")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def seed_database(db_url: str, *, n_prompts: int, k: int, annotators_per_prompt: int, users: list[str],
                  xss: bool = False, lease_seconds: int = 900) -> dict[str, str]:
    """Create project 'load' with prompts and candidates, an admin and annotators; return {user: token}."""
    from align.formats import Candidate, PromptRecord
    from annotation import services
    from annotation.db import open_db

    sm = open_db(db_url)
    tokens = {}
    with sm() as db:
        p = services.create_project(db, "load", k=k, annotators_per_prompt=annotators_per_prompt,
                                    guidelines="Rank **helpful** answers first.\n\n- be fair\n- ties are fine",
                                    lease_seconds=lease_seconds)
        recs = []
        for i in range(n_prompts):
            cands = [Candidate(f"Answer {j} to question {i}.\n\n- point one\n- point two\n\n```python\nprint({j})\n```", "demo")
                     for j in range(k)]
            if xss and i == 0:
                cands[0] = Candidate("<img src=x onerror=alert(1)>", "demo")
                cands[1] = Candidate("<script>window.__xss = 1</script>", "demo")
            recs.append(PromptRecord(f"Question {i}: how do I *do* thing {i}?", f"q{i}", cands))
        services.add_prompts(db, p, recs)
        admin = services.create_user(db, "admin", PASSWORD, "admin")
        tokens["admin"] = services.issue_api_token(db, admin)
        for name in users:
            tokens[name] = services.issue_api_token(db, services.create_user(db, name, PASSWORD))
    sm.kw["bind"].dispose()
    return tokens
