"""Load + durability benchmark for the annotation app (issue 3 acceptance checks).

N concurrent annotator clients (asyncio + httpx, one API token each) loop "next task" ->
"submit" against a real `align annotate serve` process on 127.0.0.1 for D seconds.
Prints submissions/s, p50/p99 latency of next-task and submit, and checks the database
afterwards: every acknowledged (2xx) ranking present with its exact order, none twice,
no prompt over its annotator count.

With --kill-at T the server is killed with SIGKILL T seconds in, restarted on the same
database, and the clients carry on; the same checks then prove durability.

    python bench/annotation_load.py --clients 50 --duration 60
    python bench/annotation_load.py --clients 50 --duration 60 --kill-at 30
    python bench/annotation_load.py --db postgresql+psycopg://... (a fresh database)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from annotation.devserver import ServerProcess, seed_database  # noqa: E402


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100.0 * (len(values) - 1))))]


async def client(name: str, token: str, url_ref: dict, stop_at: float, stats: dict, rng: random.Random) -> None:
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(headers=headers, timeout=30) as c:
        while time.time() < stop_at:
            base = url_ref["url"]
            try:
                t0 = time.perf_counter()
                r = await c.post(base + "/api/projects/load/next")
                stats["next_ms"].append((time.perf_counter() - t0) * 1000)
                if r.status_code == 204:
                    stats["exhausted"] += 1
                    return
                if r.status_code != 200:
                    stats["errors"][f"next {r.status_code}"] += 1
                    await asyncio.sleep(0.05)
                    continue
                task = r.json()
                ids = [x["id"] for x in task["candidates"]]
                rng.shuffle(ids)
                order = [[ids[0], ids[1]]] + [[i] for i in ids[2:]] if rng.random() < 0.2 else [[i] for i in ids]
                t0 = time.perf_counter()
                s = await c.post(f"{base}/api/tasks/{task['id']}/ranking", json={"order": order, "time_spent_ms": 1000})
                stats["submit_ms"].append((time.perf_counter() - t0) * 1000)
                if s.status_code == 201:
                    stats["acked"].append((s.json()["id"], task["id"], order, time.time()))
                else:
                    stats["errors"][f"submit {s.status_code}"] += 1
            except (httpx.TransportError, httpx.RemoteProtocolError):
                stats["errors"]["connection (server down)"] += 1
                await asyncio.sleep(0.2)


async def run_clients(n: int, tokens: dict, url_ref: dict, duration: float, stats: dict) -> None:
    stop_at = time.time() + duration
    names = [f"ann{i:03d}" for i in range(n)]
    await asyncio.gather(*(client(u, tokens[u], url_ref, stop_at, stats, random.Random(u)) for u in names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--prompts", type=int, default=6000)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--annotators-per-prompt", type=int, default=3)
    ap.add_argument("--db", default=None, help="database URL (default: a new SQLite file in a temp dir)")
    ap.add_argument("--kill-at", type=float, default=None, help="SIGKILL the server after this many seconds, then restart it")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="align-load-"))
    db_url = args.db or f"sqlite:///{tmp / 'load.db'}"
    users = [f"ann{i:03d}" for i in range(args.clients)]
    t0 = time.time()
    tokens = seed_database(db_url, n_prompts=args.prompts, k=args.k, annotators_per_prompt=args.annotators_per_prompt, users=users)
    print(f"seeded {args.prompts} prompts x {args.k} candidates, {len(users)} annotators in {time.time() - t0:.1f} s ({db_url.split('@')[-1]})")

    server = ServerProcess(db_url, tmp / "server.log").start()
    url_ref = {"url": server.url}
    stats = {"next_ms": [], "submit_ms": [], "acked": [], "errors": Counter(), "exhausted": 0}
    killed_at = restarted_after = None

    async def killer():
        nonlocal killed_at, restarted_after
        await asyncio.sleep(args.kill_at)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        killed_at = time.time()
        print(f"kill -9 server (pid {server.proc.pid}) at t={args.kill_at:.0f}s; {len(stats['acked'])} rankings acknowledged so far")
        await asyncio.get_running_loop().run_in_executor(None, server.start)
        restarted_after = time.time() - killed_at
        print(f"server restarted in {restarted_after:.1f} s")

    async def everything():
        tasks = [run_clients(args.clients, tokens, url_ref, args.duration, stats)]
        if args.kill_at is not None:
            tasks.append(killer())
        await asyncio.gather(*tasks)

    start = time.time()
    try:
        asyncio.run(everything())
    finally:
        elapsed = time.time() - start
        server.stop()

    # ---- verify against the database
    from annotation.db import open_db
    from annotation.models import RankingRow

    sm = open_db(db_url)
    with sm() as db:
        rows = {r.id: r for r in db.query(RankingRow).all()}
    sm.kw["bind"].dispose()
    acked = stats["acked"]
    missing = [a for a in acked if a[0] not in rows]
    wrong = [a for a in acked if a[0] in rows and (rows[a[0]].order != a[2] or rows[a[0]].assignment_id != a[1])]
    dup_ack = len(acked) - len({a[0] for a in acked})
    per_pair = Counter((r.prompt_id, r.user_id) for r in rows.values() if r.revision == 1)
    per_prompt = Counter(r.prompt_id for r in rows.values() if r.revision == 1)
    over = sum(1 for c in per_prompt.values() if c > args.annotators_per_prompt)

    n_sub = len(acked)
    print()
    print("| metric | value |")
    print("| --- | --- |")
    print(f"| clients / duration | {args.clients} / {elapsed:.1f} s |")
    print(f"| CPU cores | {os.cpu_count()} |")
    print(f"| acknowledged submissions | {n_sub} |")
    print(f"| submissions/s | {n_sub / elapsed:.1f} |")
    print(f"| next-task latency p50 / p99 | {pct(stats['next_ms'], 50):.1f} / {pct(stats['next_ms'], 99):.1f} ms |")
    print(f"| submit latency p50 / p99 | {pct(stats['submit_ms'], 50):.1f} / {pct(stats['submit_ms'], 99):.1f} ms |")
    print(f"| errors | {dict(stats['errors']) or 'none'} |")
    if args.kill_at is not None:
        print(f"| kill -9 at / restart took | {args.kill_at:.0f} s / {restarted_after or float('nan'):.1f} s |")
        print(f"| stored but never acknowledged (reply lost in the kill) | {len(rows) - n_sub} |")
    print(f"| acknowledged rankings missing from DB | {len(missing)} |")
    print(f"| acknowledged rankings stored differently | {len(wrong)} |")
    print(f"| duplicated rankings (same annotator+prompt, or id acked twice) | {sum(c - 1 for c in per_pair.values()) + dup_ack} |")
    print(f"| prompts over their annotator count | {over} |")
    ok = not missing and not wrong and not dup_ack and all(c == 1 for c in per_pair.values()) and not over
    print(f"\nRESULT: {'PASS' if ok else 'FAIL'} (database at {db_url.split('@')[-1]})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
