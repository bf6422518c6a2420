"""30 simulated annotators rank at once through the HTTP API of a real server process:
every acknowledged ranking is stored exactly once and no prompt gets more annotators than
configured."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from tests.annotation.conftest import ServerProcess, seed_database

N_ANNOTATORS, N_PROMPTS, K, PER_PROMPT = 30, 40, 3, 3


def run_each_then_stop(fn, names: list[str], server: ServerProcess, timeout: float) -> None:
    """fn(name) in a thread per name, all at once; the server stops when they are done."""
    threads = [threading.Thread(target=fn, args=(name,)) for name in names]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
    finally:
        server.stop()


@pytest.fixture
def server_db(db_url):
    """The suite's SQLite / PostgreSQL database URL (tests/annotation/conftest.py)."""
    return db_url


@pytest.mark.slow
def test_thirty_annotators_at_once(server_db, tmp_path):
    import httpx

    users = [f"ann{i:02d}" for i in range(N_ANNOTATORS)]
    tokens = seed_database(server_db, n_prompts=N_PROMPTS, k=K, annotators_per_prompt=PER_PROMPT, users=users)
    server = ServerProcess(server_db, tmp_path / "server.log").start()
    acked: list[tuple[int, int, list]] = []  # (ranking id, task id, order)
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(N_ANNOTATORS)

    def annotator(name: str) -> None:
        rng = random.Random(name)
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {tokens[name]}"}, timeout=60) as c:
            barrier.wait()
            while True:
                r = c.post("/api/projects/load/next")
                if r.status_code == 204:
                    return
                if r.status_code != 200:
                    errors.append(f"{name} next {r.status_code} {r.text}")
                    return
                task = r.json()
                ids = [x["id"] for x in task["candidates"]]
                rng.shuffle(ids)
                order = [[ids[0]], ids[1:]] if rng.random() < 0.3 else [[i] for i in ids]  # some ties
                s = c.post(f"/api/tasks/{task['id']}/ranking", json={"order": order})
                if s.status_code == 201:
                    with lock:
                        acked.append((s.json()["id"], task["id"], order))
                else:
                    errors.append(f"{name} submit {s.status_code} {s.text}")

    run_each_then_stop(annotator, users, server, timeout=120)
    assert errors == []

    from annotation.db import open_db
    from annotation.models import Assignment, RankingRow

    sm = open_db(server_db)
    with sm() as db:
        rows = {r.id: r for r in db.query(RankingRow).all()}
        assignments = {a.id: a for a in db.query(Assignment).all()}
    sm.kw["bind"].dispose()
    assert len(acked) == N_PROMPTS * PER_PROMPT  # every slot filled, each by one acknowledged ranking
    assert len(rows) == len(acked)  # nothing stored that was not acknowledged, nothing twice
    for rid, task_id, order in acked:
        assert rows[rid].assignment_id == task_id and rows[rid].order == order and rows[rid].revision == 1
    per_prompt = Counter(r.prompt_id for r in rows.values())
    assert max(per_prompt.values()) == PER_PROMPT and len(per_prompt) == N_PROMPTS
    pairs = Counter((r.prompt_id, r.user_id) for r in rows.values())
    assert max(pairs.values()) == 1  # nobody ranked a prompt twice
    assert all(a.status == "done" for a in assignments.values())


def test_more_requests_at_once_than_server_threads(server_db, tmp_path):
    """60 clients at once (the server's threadpool has 40 threads) each sign in by token,
    read themselves and lease a task: every request is answered promptly. A request that
    kept a database transaction open past its service call used to park all 40 threads on
    the SQLite writer lock for 60 s."""
    import httpx

    users = [f"many{i:02d}" for i in range(60)]
    tokens = seed_database(server_db, n_prompts=80, k=2, annotators_per_prompt=1, users=users)
    server = ServerProcess(server_db, tmp_path / "server.log").start()
    statuses: list[tuple[str, int]] = []
    barrier = threading.Barrier(len(users))

    def client(name: str) -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {tokens[name]}"}, timeout=20) as c:
            barrier.wait()
            for method, path in (("GET", "/api/me"), ("GET", "/api/projects/load"), ("POST", "/api/projects/load/next")):
                try:
                    response = c.request(method, path)
                    # a claim that lost every race is told to come back (503, Retry-After), as the page does
                    for _ in range(3):
                        if response.status_code != 503 or "retry-after" not in response.headers:
                            break
                        time.sleep(min(float(response.headers["retry-after"]), 1.0))
                        response = c.request(method, path)
                    statuses.append((path, response.status_code))
                except httpx.TimeoutException:
                    statuses.append((path, 0))

    run_each_then_stop(client, users, server, timeout=90)
    assert len(statuses) == 3 * len(users)
    assert Counter(s for _p, s in statuses) == Counter({200: 3 * len(users)}), Counter(statuses)
