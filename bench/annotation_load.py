"""Load and durability benchmark for the annotation app.

Two phases against a real `align annotate serve` process on 127.0.0.1, each D seconds:

* closed loop: N annotator clients (asyncio, one keep-alive connection and API token each)
  loop "next task" -> "submit" as fast as the server answers; gives the throughput ceiling.
* open loop: the same N annotators start a ranking at Poisson arrival times, R rankings/s in
  all, whatever the server does; latency is measured from the scheduled start (so a server
  that falls behind shows it, no coordinated omission).

* import: the open loop again; --import-after seconds into it an admin imports
  --import-prompts prompts (K candidates each, one JSONL body) into another project
  through the API; next/submit latencies are reported apart for rankings started before
  the import, during it and after it.
* overload: --overload-connections more annotators, each on a connection of its own, in
  closed loop with no pause, far more requests at once than the server takes on (its
  max_in_flight per worker, its threads and connection pool): they must be answered 503
  with Retry-After, which the clients honour as the ranking page does, not queued into
  stalls. Reports the 503s and the slowest answer of any kind.

On SQLite the WAL file's size is sampled through every phase (its largest and its size at
the phase's end): `--phases open --duration 600` is the sustained check of the WAL bound.

A warm-up of closed loop comes first (--warmup, not in the table). Prints rankings/s,
p50/p99 of next-task (tasks handed out) and submit (rankings stored), and the CPU other jobs took, per phase; then checks the database:
every acknowledged (2xx) ranking present with its exact order, none twice, no prompt over
its annotator count. With --kill-at T the server is killed with SIGKILL T seconds into the
last phase run (the open loop by default), restarted on the same database, and the clients
carry on; the same checks then prove durability. The last line says PASS, FAIL (a check
failed; exit 1) or INCOMPLETE (the prompts ran out before a phase ended; exit 2).

    python bench/annotation_load.py --clients 50 --duration 30 --rate 200
    python bench/annotation_load.py --phases open --duration 60 --kill-at 30
    python bench/annotation_load.py --phases import --import-prompts 100000 --duration 60 --kill-at 10
    python bench/annotation_load.py --phases overload --duration 20 --warmup 0
    python bench/annotation_load.py --db postgresql+psycopg://... (a fresh database)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from annotation.devserver import ServerProcess, run_async, run_script, seed_database  # noqa: E402


class Connection:
    """One annotator's keep-alive HTTP/1.1 connection: a minimal client, so that on a
    small machine the load generator leaves the CPU to the server it measures (httpx
    spends about 3 ms of CPU per request; this about 0.2 ms). Reconnects after the server
    went away; a request that was cut off raises ConnectionError."""

    def __init__(self, url: str, token: str):
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port, self.token = host, int(port), token
        self.reader = self.writer = None
        self.retry_after = 0.0  # the last response's Retry-After, in seconds

    async def request(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        import json

        data = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nhost: {self.host}\r\nauthorization: Bearer {self.token}\r\n"
                f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n").encode()
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.write(head + data)
            lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
            status = int(lines[0].split()[1])
            length, self.retry_after = 0, 0.0
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                elif name.strip().lower() == b"retry-after":
                    self.retry_after = float(value)
            payload = await self.reader.readexactly(length) if length else b""
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise ConnectionError(str(exc)) from None
        try:
            return status, (json.loads(payload) if payload else None)
        except ValueError:  # not JSON (a plain-text 500, say): the caller counts the status as an error
            return status, payload.decode(errors="replace")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# --timeline: (wall-clock start, next ms, submit ms or None, outcome) of every ranking.
TIMELINE: list[tuple[float, float, float | None, str]] | None = None


def _timeline(t_start: float, next_ms: float, submit_ms: float | None, outcome: str) -> None:
    if TIMELINE is not None:
        TIMELINE.append((time.time() - (time.perf_counter() - t_start), next_ms, submit_ms, outcome))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100.0 * (len(values) - 1))))]


def _order(task: dict, rng: random.Random) -> list:
    ids = [x["id"] for x in task["candidates"]]
    rng.shuffle(ids)
    return [[ids[0], ids[1]]] + [[i] for i in ids[2:]] if rng.random() < 0.2 else [[i] for i in ids]


async def one_ranking(c: Connection, stats: dict, rng: random.Random, t_start: float) -> str:
    """next + submit; latencies from `t_start` (the scheduled start in the open loop).
    Returns 'ok', 'exhausted', 'busy' (a 503) or 'error'."""
    try:
        status, task = await c.request("POST", "/api/projects/load/next")
        next_ms = (time.perf_counter() - t_start) * 1000
        stats["answer_ms"].append(next_ms)
        if status == 200:  # the latency columns are of tasks handed out; a quick 503 or 204 would flatter them
            stats["next_ms"].append(next_ms)
        if status == 204:
            stats["ran_dry"] += 1
            return "exhausted"
        if status != 200:
            stats["errors"][f"next {status}"] += 1
            _timeline(t_start, next_ms, None, f"next {status}")
            return "busy" if status == 503 else "error"
        order = _order(task, rng)
        t0 = time.perf_counter()
        status, ranking = await c.request("POST", f"/api/tasks/{task['id']}/ranking", {"order": order, "time_spent_ms": 1000})
        submit_ms = (time.perf_counter() - t0) * 1000
        stats["answer_ms"].append(submit_ms)
        _timeline(t_start, next_ms, submit_ms, "ok" if status == 201 else f"submit {status}")
        if status == 201:
            stats["submit_ms"].append(submit_ms)
            stats["acked"].append((ranking["id"], task["id"], order, time.time()))
            return "ok"
        stats["errors"][f"submit {status}"] += 1
        return "busy" if status == 503 else "error"
    except ConnectionError:
        stats["errors"]["connection (server down)"] += 1
        return "error"


async def closed_client(token: str, url_ref: dict, stop_at: float, stats: dict, rng: random.Random,
                        honour_retry_after: bool = False) -> None:
    """Rankings back to back until `stop_at`; after an error or a 503 a pause of 0.1 s, or with
    `honour_retry_after` the answer's Retry-After, as the ranking page does (the overload phase:
    a client that does not would only spin)."""
    c = Connection(url_ref["url"], token)
    while time.time() < stop_at:
        res = await one_ranking(c, stats, rng, time.perf_counter())
        if res == "exhausted":
            break
        if res in ("error", "busy"):
            await asyncio.sleep((c.retry_after if honour_retry_after else None) or 0.1)
    c.close()


async def watch_wal(path: str, stats: dict) -> None:
    """Sample the size of SQLite's WAL file every 0.2 s into stats["wal_max"]."""
    while True:
        try:
            stats["wal_max"] = max(stats.get("wal_max", 0), os.path.getsize(path))
        except OSError:  # no WAL file at this moment
            pass
        await asyncio.sleep(0.2)


async def open_client(token: str, url_ref: dict, duration: float, rate: float, stats_for, rng: random.Random) -> None:
    """Rankings start at Poisson arrivals of `rate` per second; one at a time per annotator
    (a person holds one task), so a late start waits for the previous one and counts it.
    Arrivals still waiting when the phase ends are counted as not started. `stats_for()`
    is the stats dict a ranking starting now counts in."""
    c = Connection(url_ref["url"], token)
    t_perf, t_end = time.perf_counter(), time.perf_counter() + duration
    next_at = t_perf + rng.expovariate(rate)
    while next_at < t_end:
        delay = next_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif time.perf_counter() > t_end + 5:  # the server fell behind: the backlog is not served
            while next_at < t_end:
                stats_for()["not_started"] += 1
                next_at += rng.expovariate(rate)
            break
        stats = stats_for()
        stats["scheduled"] += 1
        if await one_ranking(c, stats, rng, next_at) == "exhausted":
            break
        next_at += rng.expovariate(rate)
    c.close()


def oversized_bodies(base: str, token: str) -> list[tuple[str, int, float]]:
    """Time the refusal of ranking bodies built to burn server CPU: 1 MiB of ids, and just
    under the 32 KiB task-body limit (thousands of ids for a K=4 task). Median of 5 each."""
    import json

    import httpx

    out = []
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        task = c.post(base + "/api/projects/load/next").json()
        ids = [x["id"] for x in task["candidates"]]
        url = f"{base}/api/tasks/{task['id']}/ranking"
        huge = json.dumps({"order": [list(range(1, 150_000))]}).encode()
        n = 1
        while len(json.dumps({"order": [ids * n]})) < 30_000:
            n *= 2
        near = json.dumps({"order": [ids * (n // 2)]}).encode()
        for label, body in ((f"1 MiB ranking body ({len(huge)} bytes)", huge), (f"{len(near)}-byte body, {len(ids) * (n // 2)} ids", near)):
            times, status = [], 0
            for _ in range(5):
                t0 = time.perf_counter()
                r = c.post(url, content=body, headers={"content-type": "application/json"})
                times.append((time.perf_counter() - t0) * 1000)
                status = r.status_code
            out.append((label, status, sorted(times)[2]))
        c.post(f"{base}/api/tasks/{task['id']}/skip", json={"reason": "benchmark probe"})
    return out


def import_body(n: int, k: int) -> bytes:
    """A prompts JSONL file of `n` prompts with `k` candidates each, as an admin uploads it."""
    import json

    return "".join(json.dumps({"prompt": f"Imported question {i}: what would you answer?", "id": f"imp{i}",
                               "candidates": [f"imported answer {j} to question {i}" for j in range(k)]}) + "\n"
                   for i in range(n)).encode()


def run_import(base: str, token: str, body: bytes, window: dict, after_s: float) -> None:
    """POST the import (into project "bulk") `after_s` seconds from now, recording when it
    ran and how it ended."""
    import httpx

    time.sleep(after_s)
    window["start"] = time.time()
    try:
        r = httpx.post(f"{base}/api/projects/bulk/import?format=prompts", content=body, timeout=600,
                       headers={"Authorization": f"Bearer {token}", "content-type": "application/x-ndjson"})
        window["status"] = r.status_code
        window["added"] = r.json().get("prompts_added") if r.status_code == 201 else r.text[:200]
    except httpx.HTTPError as exc:  # the server was killed during it (--kill-at)
        window["status"], window["added"] = "cut off", str(exc)[:200]
    window["end"] = time.time()


def cpu_seconds(server_pgid: int) -> tuple[float, float]:
    """CPU seconds used so far by the whole machine (all cores), and by this benchmark's own
    processes: itself, the server's process group (its workers and import process) and
    PostgreSQL's processes. Their difference over a phase is what other jobs on the machine
    took meanwhile (processes that ended during it, as in a kill, count as other). Linux."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return float("nan"), float("nan")
    own = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:  # ended meanwhile
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if int(pid) == os.getpid() or int(rest[2]) == server_pgid or name.startswith("postgres"):
            own += int(rest[11]) + int(rest[12])  # utime + stime
    return (sum(fields) - fields[3] - fields[4]) / tick, own / tick  # all but idle and iowait


def new_stats() -> dict:
    return {"next_ms": [], "submit_ms": [], "answer_ms": [], "acked": [], "errors": Counter(), "scheduled": 0, "not_started": 0,
            "ran_dry": 0}


# Prompts seeded when --prompts is not given: enough for every annotator slot a run can fill
# at this closed-loop rate (a fast 2-core machine serves about 800/s), so that no phase is
# cut short by an empty queue.
CLOSED_LOOP_CEILING = 1500


def prompts_needed(phases: list[str], duration: float, warmup: float, rate: float, annotators_per_prompt: int) -> int:
    # (an import phase offers `rate`, as the open loop does)
    rankings = CLOSED_LOOP_CEILING * warmup + sum(CLOSED_LOOP_CEILING * duration if p in ("closed", "overload")
                                                  else rate * duration for p in phases)
    return -(-int(rankings) // annotators_per_prompt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=50, help="annotators (closed and open loop)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per phase")
    ap.add_argument("--phases", default="closed,open",
                    help="closed, open, import, overload, in any order, comma-separated")
    ap.add_argument("--import-prompts", type=int, default=100_000, help="import phase: prompts the admin imports")
    ap.add_argument("--import-after", type=float, default=5.0,
                    help="import phase: seconds of open loop before the admin posts the import (an import into a "
                         "server that is serving, its connections open)")
    ap.add_argument("--overload-connections", type=int, default=600,
                    help="overload phase: annotators (one connection each) besides --clients")
    ap.add_argument("--rate", type=float, default=200.0, help="open loop: rankings/s started in all")
    ap.add_argument("--prompts", type=int, default=None,
                    help=f"prompts to seed (default: enough for {CLOSED_LOOP_CEILING} rankings/s in closed loop)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--annotators-per-prompt", type=int, default=3)
    ap.add_argument("--db", default=None, help="database URL (default: a new SQLite file in a temp dir)")
    ap.add_argument("--workers", type=int, default=3, help="server worker processes (the documented figures: 3 on 2 cores)")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds of closed loop before the measured phases")
    ap.add_argument("--kill-at", type=float, default=None,
                    help="SIGKILL the server this many seconds into the last phase, then restart it")
    ap.add_argument("--timeline", type=Path, default=None,
                    help="write every ranking's start time (Unix s), next and submit latency (ms) and outcome to "
                         "this CSV file, and the import's start and end as comment lines: to line up with "
                         "the database's own log")
    args = ap.parse_args()
    global TIMELINE
    TIMELINE = [] if args.timeline else None
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or any(p not in ("closed", "open", "import", "overload") for p in phases):
        ap.error("--phases takes closed, open, import and overload, comma-separated")

    if args.prompts is None:
        args.prompts = prompts_needed(phases, args.duration, args.warmup, args.rate, args.annotators_per_prompt)

    tmp = Path(tempfile.mkdtemp(prefix="align-load-"))
    db_url = args.db or f"sqlite:///{tmp / 'load.db'}"
    users = [f"ann{i:03d}" for i in range(args.clients)]
    crowd = [f"ovl{i:04d}" for i in range(args.overload_connections)] if "overload" in phases else []
    wal_path = db_url.split(":///", 1)[1] + "-wal" if db_url.startswith("sqlite:///") else None
    t0 = time.time()
    tokens = seed_database(db_url, n_prompts=args.prompts, k=args.k, annotators_per_prompt=args.annotators_per_prompt,
                           users=users, token_only_users=crowd)
    print(f"seeded {args.prompts} prompts x {args.k} candidates, {len(users)} annotators in {time.time() - t0:.1f} s "
          f"({db_url.split('@')[-1]}); load average before: {os.getloadavg()[0]:.1f}")

    # Leave what the seeding loaded (the app, SQLAlchemy) out of this process's collections:
    # a full collection of it stops every client for about 35 ms, which would be counted as
    # the server's latency.
    gc.collect()
    gc.freeze()
    server = ServerProcess(db_url, tmp / "server.log", workers=args.workers).start()
    url_ref = {"url": server.url}
    probes = oversized_bodies(server.url, tokens["admin"])
    results: list[tuple[str, dict, float]] = []
    kill_info: dict = {}

    async def killer(stats: dict):
        await asyncio.sleep(args.kill_at)
        server.kill9()
        killed = time.time()
        so_far = len(stats["acked"]) + sum(len(stats.get(part, {}).get("acked", [])) for part in ("before_import", "during_import"))
        print(f"kill -9 server (pid {server.proc.pid}) at t={args.kill_at:.0f}s; {so_far} acknowledged in this phase so far")
        await asyncio.get_running_loop().run_in_executor(None, server.start)
        kill_info["restart_s"] = time.time() - killed
        print(f"server restarted in {kill_info['restart_s']:.1f} s")

    window: dict = {}  # the import phase's import: start, end, status, added

    def stats_now(stats: dict) -> dict:
        """The import phase counts rankings started before the import, while it runs and
        after it apart (the last in `stats` itself)."""
        if "start" not in window:
            return stats.setdefault("before_import", new_stats())
        if "end" in window:
            return stats
        return stats.setdefault("during_import", new_stats())

    async def phase(kind: str, stats: dict, kill: bool, duration: float | None = None):
        rngs = {u: random.Random(f"{kind}:{u}") for u in users}
        if kind in ("closed", "overload"):
            stop_at = time.time() + (duration or args.duration)
            who = users if kind == "closed" else users + crowd
            rngs.update({u: random.Random(f"{kind}:{u}") for u in crowd})
            jobs = [closed_client(tokens[u], url_ref, stop_at, stats, rngs[u], honour_retry_after=kind == "overload")
                    for u in who]
        else:
            per_client = args.rate / len(users)
            stats_for = (lambda: stats_now(stats)) if kind == "import" else (lambda: stats)
            jobs = [open_client(tokens[u], url_ref, args.duration, per_client, stats_for, rngs[u]) for u in users]
        if kind == "import":
            body = import_body(args.import_prompts, args.k)
            jobs.append(asyncio.get_running_loop().run_in_executor(
                None, run_import, url_ref["url"], tokens["admin"], body, window, args.import_after))
        if kill:
            jobs.append(killer(stats))
        watcher = asyncio.create_task(watch_wal(wal_path, stats)) if wal_path else None
        try:
            await asyncio.gather(*jobs)
        finally:
            if watcher is not None:
                watcher.cancel()
                stats["wal_end"] = os.path.getsize(wal_path) if os.path.exists(wal_path) else 0

    warmup = new_stats()
    try:
        if args.warmup > 0:
            # A server that has been running: pools and prepared statements warm (the
            # PostgreSQL statistics are those the import gathered, as on a real server).
            run_async(phase("closed", warmup, False, duration=args.warmup))
            print(f"warm-up: {len(warmup['acked'])} rankings in {args.warmup:g} s (not in the table; checked below)")
        for i, kind in enumerate(phases):
            stats = new_stats()
            start, cpu_before = time.time(), cpu_seconds(server.proc.pid)
            run_async(phase(kind, stats, args.kill_at is not None and i == len(phases) - 1))
            results.append((kind, stats, time.time() - start))
            (busy, own), (busy_before, own_before) = cpu_seconds(server.proc.pid), cpu_before
            stats["other_cores"] = (busy - busy_before - (own - own_before)) / results[-1][2]
            print(f"{kind} loop done: {len(stats['acked'])} rankings in {results[-1][2]:.1f} s")
    finally:
        server.stop()

    # ---- verify against the database
    from annotation.db import open_db
    from annotation.models import RankingRow

    sm = open_db(db_url)
    with sm() as db:
        rows = {r.id: r for r in db.query(RankingRow).all()}
    sm.kw["bind"].dispose()
    # The import phase's rankings started during the import are rows of their own.
    rows_of_table: list[tuple[str, str, dict, float]] = []  # (phase, row label, stats, seconds)
    for kind, st, elapsed in results:
        if kind == "closed":
            rows_of_table.append((kind, "closed loop", st, elapsed))
            continue
        if kind == "overload":
            rows_of_table.append((kind, f"overload: {len(users) + len(crowd)} annotators in closed loop, each on a "
                                        "connection of its own, Retry-After honoured", st, elapsed))
            continue
        offered = f"open loop, {args.rate:g}/s offered"
        if kind == "import":
            before, during = st.pop("before_import", new_stats()), st.pop("during_import", new_stats())
            took = window.get("end", time.time()) - window.get("start", time.time())
            if args.import_after > 0 or before["scheduled"]:  # (with no lead-in, those started as it was posted)
                rows_of_table.append((kind, f"{offered}, before the import", before, max(args.import_after, 1e-9)))
            rows_of_table.append((kind, f"{offered}, during the import of {args.import_prompts} prompts", during, took))
            rows_of_table.append((kind, f"{offered}, after the import", st,
                                  max(elapsed - took - args.import_after, 1e-9)))
        else:
            rows_of_table.append((kind, offered, st, elapsed))
    acked = warmup["acked"] + [a for _kind, _label, st, _e in rows_of_table for a in st["acked"]]
    missing = [a for a in acked if a[0] not in rows]
    wrong = [a for a in acked if a[0] in rows and (rows[a[0]].order != a[2] or rows[a[0]].assignment_id != a[1])]
    dup_ack = len(acked) - len({a[0] for a in acked})
    per_pair = Counter((r.prompt_id, r.user_id) for r in rows.values() if r.revision == 1)
    per_prompt = Counter(r.prompt_id for r in rows.values() if r.revision == 1 and not r.skipped)
    over = sum(1 for c in per_prompt.values() if c > args.annotators_per_prompt)

    if args.timeline:
        with open(args.timeline, "w") as f:
            f.write("".join(f"# import {key} {window[key]:.3f}\n" for key in ("start", "end") if key in window))
            f.write("start_s,next_ms,submit_ms,outcome\n")
            f.writelines(f"{t:.3f},{n:.1f},{'' if s is None else f'{s:.1f}'},{o}\n" for t, n, s, o in sorted(TIMELINE))
    print()
    print(f"database: {db_url.split(':')[0].split('+')[0]}; server workers: {args.workers}; {os.cpu_count()} CPU cores; "
          f"load average after: {os.getloadavg()[0]:.1f}; {args.clients} annotators")
    print()
    print("| phase | duration | rankings/s | next p50 / p99 ms | submit p50 / p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, label, st, elapsed in rows_of_table:
        if kind not in ("closed", "overload"):
            label += f" ({st['scheduled']} started, {st['not_started']} not started: server behind)"
        if st["ran_dry"]:
            label += ", cut short: no prompt left"
        print(f"| {label} | {elapsed:.1f} s | {len(st['acked']) / elapsed:.1f} | "
              f"{pct(st['next_ms'], 50):.1f} / {pct(st['next_ms'], 99):.1f} | "
              f"{pct(st['submit_ms'], 50):.1f} / {pct(st['submit_ms'], 99):.1f} | {dict(st['errors']) or 'none'} |")
    print()
    print("| check | value |")
    print("| --- | --- |")
    for label, status, ms in probes:
        print(f"| {label}: refused with | {status} in {ms:.1f} ms (median of 5) |")
    for kind, st, _elapsed in results:
        print(f"| CPU used by other jobs on the machine during the {kind} phase | {st['other_cores']:.2f} cores |")
        if "wal_end" in st:
            print(f"| SQLite WAL file in the {kind} phase: largest (sampled every 0.2 s) / at its end | "
                  f"{st.get('wal_max', 0) / 2**20:.1f} / {st['wal_end'] / 2**20:.1f} MiB |")
        if kind == "overload":
            answers = st["answer_ms"]
            print(f"| overload: requests answered / 503 with Retry-After among them | {len(answers)} / "
                  f"{st['errors']['next 503'] + st['errors']['submit 503']} |")
            print(f"| overload: slowest answer (any status) / p99 | {max(answers, default=float('nan')):.0f} / "
                  f"{pct(answers, 99):.0f} ms |")
    if "start" in window:
        print(f"| import of {args.import_prompts} prompts (K={args.k}) through the API | {window.get('status')}: "
              f"{window.get('added')} added in {window.get('end', float('nan')) - window['start']:.1f} s |")
    if args.kill_at is not None:
        print(f"| kill -9 at / restart took | {args.kill_at:.0f} s / {kill_info.get('restart_s', float('nan')):.1f} s |")
        print(f"| stored but never acknowledged (reply lost in the kill) | {sum(not r.skipped for r in rows.values()) - len(acked)} |")
    print(f"| acknowledged rankings | {len(acked)} |")
    print(f"| acknowledged rankings missing from DB | {len(missing)} |")
    print(f"| acknowledged rankings stored differently | {len(wrong)} |")
    print(f"| duplicated rankings (same annotator+prompt, or id acked twice) | {sum(c - 1 for c in per_pair.values()) + dup_ack} |")
    print(f"| prompts over their annotator count | {over} |")
    ok = not missing and not wrong and not dup_ack and all(c == 1 for c in per_pair.values()) and not over
    dry = (["warm-up"] if warmup["ran_dry"] else []) + list(dict.fromkeys(
        kind for kind, _label, st, _e in rows_of_table if st["ran_dry"]))
    if dry:
        print(f"\nThe prompts ran out in the {', '.join(dry)} phase: its figures cover less than the phase "
              f"it was asked for. Seed more than {args.prompts} with --prompts.")
    verdict = "FAIL" if not ok else "INCOMPLETE" if dry else "PASS"
    print(f"\nRESULT: {verdict} (database at {db_url.split('@')[-1]})")
    sys.exit({"PASS": 0, "FAIL": 1, "INCOMPLETE": 2}[verdict])


if __name__ == "__main__":
    run_script(main)
