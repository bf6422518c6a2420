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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from annotation.devserver import ServerProcess, run_async, run_script, seed_database  # noqa: E402
from bench import annotation_client  # noqa: E402
from bench.annotation_client import closed_client, import_body, new_stats, open_client, oversized_bodies, run_import  # noqa: E402
from bench.annotation_report import report  # noqa: E402


async def watch_wal(path: str, stats: dict) -> None:
    """Sample the size of SQLite's WAL file every 0.2 s into stats["wal_max"]."""
    while True:
        try:
            stats["wal_max"] = max(stats.get("wal_max", 0), os.path.getsize(path))
        except OSError:  # no WAL file at this moment
            pass
        await asyncio.sleep(0.2)


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
    annotation_client.TIMELINE = [] if args.timeline else None
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

    report(args, db_url, len(users) + len(crowd), warmup, results, window, probes, kill_info)


if __name__ == "__main__":
    run_script(main)
