"""A served app in a child process and a seeded database, for the benchmarks
(bench/annotation_load.py, bench/annotation_cpu.py) and the tests that need a real server
process."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "correct horse battery"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`align annotate serve` in a child process on 127.0.0.1."""

    def __init__(self, db_url: str, log: Path, workers: int = 1):
        self.db_url, self.port, self.log, self.workers = db_url, free_port(), log, workers
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        import httpx

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "align", "annotate", "serve", "--db", self.db_url, "--port", str(self.port),
             "--log-level", "warning", "--workers", str(self.workers)],
            cwd=REPO, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the workers go down with it
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

    def kill9(self) -> None:
        """SIGKILL the server and its worker processes at once (a crash, not a shutdown)."""
        import os
        import signal

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        import os
        import signal

        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def seed_database(db_url: str, *, n_prompts: int, k: int, annotators_per_prompt: int, users: list[str],
                  xss: bool = False, lease_seconds: int = 900, password: str = PASSWORD,
                  token_only_users: list[str] = ()) -> dict[str, str]:
    """Create project 'load' with prompts and candidates, an admin and annotators (members
    of the project); return {user: API token}. `token_only_users` are annotators with no
    password (API tokens only), so that hundreds seed in a moment (no password hashing)."""
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
        admin = services.create_user(db, "admin", password, "admin")
        tokens["admin"] = services.issue_api_token(db, admin)
        for name, secret in [(u, password) for u in users] + [(u, None) for u in token_only_users]:
            user = services.create_user(db, name, secret)
            services.add_member(db, p, user)
            tokens[name] = services.issue_api_token(db, user)
    sm.kw["bind"].dispose()
    return tokens


def run_async(coro):
    """asyncio.run, on uvloop where it is installed (the server's extras bring it, and the
    server runs on it): a load generator sharing the machine with the server it measures
    should be cheap."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run_script(main) -> None:
    """Run a benchmark's `main`: a UserError (a database URL that cannot be used, a
    database that stays busy) is one line on stderr and exit 2, not a traceback."""
    from align.errors import UserError

    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
