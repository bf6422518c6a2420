"""kill -9 the server while annotators submit; after a restart every acknowledged ranking is
there (SQLite WAL, synchronous=FULL). The 60 s, 50-client version is bench/annotation_load.py."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from tests.annotation.conftest import ServerProcess, seed_database


@pytest.mark.slow
def test_acknowledged_rankings_survive_kill_9(tmp_path):
    import httpx

    db_url = f"sqlite:///{tmp_path / 'dur.db'}"
    users = [f"ann{i}" for i in range(8)]
    # The kill comes after KILL_AFTER acknowledged rankings and the annotators stop at
    # TOTAL, whatever the machine's speed, so there is work before the kill and after the
    # restart: 400 prompts x 2 slots outlast TOTAL.
    KILL_AFTER, TOTAL = 100, 300
    tokens = seed_database(db_url, n_prompts=400, k=3, annotators_per_prompt=2, users=users)
    server = ServerProcess(db_url, tmp_path / "server.log").start()
    acked: list[tuple[int, list]] = []
    lock = threading.Lock()
    give_up = time.time() + 60.0  # for each phase: up to the kill, and after the restart

    def annotator(name):
        rng = random.Random(name)
        with httpx.Client(headers={"Authorization": f"Bearer {tokens[name]}"}, timeout=10) as c:
            while len(acked) < TOTAL and time.time() < give_up:
                try:
                    r = c.post(server.url + "/api/projects/load/next")
                    if r.status_code != 200:
                        time.sleep(0.05)
                        continue
                    ids = [x["id"] for x in r.json()["candidates"]]
                    rng.shuffle(ids)
                    s = c.post(f"{server.url}/api/tasks/{r.json()['id']}/ranking", json={"order": ids})
                    if s.status_code == 201:
                        with lock:
                            acked.append((s.json()["id"], ids))
                except httpx.HTTPError:
                    time.sleep(0.1)  # server down: retry

    threads = [threading.Thread(target=annotator, args=(u,)) for u in users]
    for t in threads:
        t.start()
    try:
        while len(acked) < KILL_AFTER and time.time() < give_up:
            time.sleep(0.01)
        before_kill = len(acked)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        server.start()
        give_up = time.time() + 60.0
        for t in threads:
            t.join(60)
    finally:
        server.stop()
    assert before_kill > 0 and len(acked) > before_kill  # work went on after the restart

    from annotation.db import open_db
    from annotation.models import RankingRow

    sm = open_db(db_url)
    with sm() as db:
        rows = {r.id: r.order for r in db.query(RankingRow).all()}
    sm.kw["bind"].dispose()
    assert all(rows.get(rid) == [[i] for i in ids] for rid, ids in acked)
