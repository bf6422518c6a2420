"""CPU per ranking of the annotation app itself, without HTTP or a load generator.

Rankings (next task + submit) are sent straight into the ASGI app, one at a time, in blocks;
the table gives the app's CPU per ranking (this process: middleware, routes, services,
driver) and, for a PostgreSQL server on this machine, the server's. A loaded server adds the
HTTP layer and the scheduling of several processes to this; `annotation_load.py` measures
that, with throughput and latency. Here the app's own cost stands alone, so a change of the
hot path shows in it. On a machine whose speed wanders, compare two versions in alternating
runs, several of each.

    python bench/annotation_cpu.py                       # a new SQLite file
    python bench/annotation_cpu.py --db postgresql+psycopg://user:pw@127.0.0.1/db
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from annotation.devserver import run_async, run_script, seed_database  # noqa: E402


def postgres_cpu_s() -> float | None:
    """CPU seconds of the PostgreSQL processes on this machine (None if none can be read)."""
    total, found = 0, False
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                if not f.read().startswith("postgres"):
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
        found = True
    return total / os.sysconf("SC_CLK_TCK") if found else None


class AsgiClient:
    """The least an ASGI request needs: one body, the response collected."""

    def __init__(self, app):
        self.app = app

    async def request(self, method: str, path: str, token: str, body: bytes = b"") -> tuple[int, bytes]:
        headers = [(b"host", b"bench"), (b"authorization", f"Bearer {token}".encode())]
        if body:
            headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        status, chunks = 0, []

        async def receive():
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client never disconnects

        async def send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            else:
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        return status, b"".join(chunks)


async def one_ranking(client: AsgiClient, token: str) -> None:
    status, body = await client.request("POST", "/api/projects/load/next", token)
    if status != 200:
        raise SystemExit(f"next task answered {status}: {body[:200]!r}")
    task = json.loads(body)
    order = json.dumps({"order": [[c["id"]] for c in task["candidates"]]}).encode()
    status, body = await client.request("POST", f"/api/tasks/{task['id']}/ranking", token, order)
    if status != 201:
        raise SystemExit(f"submit answered {status}: {body[:200]!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default=None, help="database URL (default: a new SQLite file in a temp dir)")
    ap.add_argument("--blocks", type=int, default=10, help="measured blocks (the table gives their median)")
    ap.add_argument("--per-block", type=int, default=200, help="rankings per block")
    ap.add_argument("--warmup", type=int, default=200, help="rankings before measuring (pools, prepared statements)")
    args = ap.parse_args()
    if args.blocks < 1 or args.per_block < 1 or args.warmup < 0:
        ap.error("--blocks and --per-block take a count of 1 or more, --warmup 0 or more")

    from annotation.app import create_app
    from annotation.settings import Settings

    db_url = args.db or f"sqlite:///{Path(tempfile.mkdtemp(prefix='align-cpu-')) / 'cpu.db'}"
    users = [f"ann{i:03d}" for i in range(10)]
    n_prompts = max(1000, (args.warmup + args.blocks * args.per_block) // 3 + 200)
    tokens = seed_database(db_url, n_prompts=n_prompts, k=4, annotators_per_prompt=3, users=users)
    app = create_app(Settings(db_url=db_url))
    client = AsgiClient(app)
    on_postgresql = not db_url.startswith("sqlite")

    async def run() -> list[tuple[float, float | None, float]]:
        blocks = []
        async with app.router.lifespan_context(app):
            for i in range(args.warmup):
                await one_ranking(client, tokens[users[i % len(users)]])
            for _ in range(args.blocks):
                # the /proc scans of postgres_cpu_s stay outside this process's measured CPU and wall time
                pg0 = postgres_cpu_s() if on_postgresql else None
                cpu0, wall0 = time.process_time(), time.perf_counter()
                for i in range(args.per_block):
                    await one_ranking(client, tokens[users[i % len(users)]])
                cpu_ms, wall_ms = (time.process_time() - cpu0) * 1e3, (time.perf_counter() - wall0) * 1e3
                pg1 = postgres_cpu_s() if on_postgresql else None
                blocks.append((cpu_ms / args.per_block,
                               None if pg0 is None or pg1 is None else (pg1 - pg0) * 1e3 / args.per_block,
                               wall_ms / args.per_block))
        app.state.engine.dispose()
        return blocks

    blocks = run_async(run())
    app_ms = [b[0] for b in blocks]
    pg_ms = [b[1] for b in blocks if b[1] is not None]
    print(f"\n{args.blocks} blocks of {args.per_block} rankings (next + submit), one at a time, after {args.warmup} "
          f"({db_url.split('@')[-1]}); load average before: {os.getloadavg()[0]:.1f}\n")
    print("| database | app CPU ms/ranking: median (min-max) | database server CPU ms/ranking | wall ms/ranking |")
    print("| --- | --- | --- | --- |")
    server = f"{statistics.median(pg_ms):.2f}" if pg_ms else ("in process" if not on_postgresql else "not readable")
    print(f"| {'PostgreSQL' if on_postgresql else 'SQLite'} | {statistics.median(app_ms):.2f} "
          f"({min(app_ms):.2f}-{max(app_ms):.2f}) | {server} | {statistics.median(b[2] for b in blocks):.2f} |")


if __name__ == "__main__":
    run_script(main)
