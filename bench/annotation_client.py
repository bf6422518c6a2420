"""What bench/annotation_load.py's annotators and admin send: a minimal keep-alive HTTP client, the
closed- and open-loop clients that rank (each ranking's latencies into a phase's stats, and into
the --timeline), the oversized bodies that probe the server's refusals, and the bulk import."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter


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


def new_stats() -> dict:
    return {"next_ms": [], "submit_ms": [], "answer_ms": [], "acked": [], "errors": Counter(), "scheduled": 0, "not_started": 0,
            "ran_dry": 0}
