"""bench/annotation_load.py: its client counts a response that is not JSON (a plain-text 500)
as an error status instead of ending the run with a traceback, a run whose prompts ran
out before a phase ended says so instead of passing, and the overload phase's clients wait
out a 503's Retry-After (its latency counted among the answers, not the tasks handed out)."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import subprocess
import sys
import time

from annotation.devserver import REPO

BENCH = REPO / "bench" / "annotation_load.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("annotation_load", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_a_plain_text_error_page_is_returned_as_its_status():
    from bench import annotation_client as bench

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        body = b"Internal Server Error"
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = bench.Connection(f"http://127.0.0.1:{port}", "token")
        try:
            return await client.request("POST", "/api/projects/load/next")
        finally:
            client.close()
            server.close()

    assert asyncio.run(main()) == (500, "Internal Server Error")


def test_a_phase_that_runs_out_of_prompts_is_reported_incomplete():
    """Three prompts last a closed loop a moment: the run must not pass off that moment as
    the 5 s phase it was asked for. The durability checks still run (and pass) on what was
    acknowledged."""
    out = subprocess.run([sys.executable, str(BENCH), "--clients", "2", "--prompts", "3",
                          "--annotators-per-prompt", "1", "--duration", "5", "--warmup", "0", "--workers", "1",
                          "--phases", "closed"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cut short: no prompt left" in out.stdout
    assert "ran out in the closed phase" in out.stdout
    assert "| acknowledged rankings missing from DB | 0 |" in out.stdout
    assert out.stdout.rstrip().splitlines()[-1].startswith("RESULT: INCOMPLETE")


def test_the_default_seed_covers_a_fast_closed_loop_and_the_open_phase():
    bench = load_bench()
    # 10 s warm-up + 30 s closed at the ceiling + 30 s open at 200/s, 3 annotators a prompt
    assert bench.prompts_needed(["closed", "open"], 30, 10, 200, 3) == (1500 * 40 + 200 * 30) // 3
    assert bench.prompts_needed(["open"], 60, 0, 100, 4) == 1500


def test_an_overload_client_waits_the_retry_after_of_a_503():
    """The overload phase's clients honour Retry-After as the ranking page does: against a
    server that answers every request 503 with Retry-After: 30, a client with a phase of a
    moment sends one request, counts it as a 503 and sends nothing more."""
    bench = load_bench()
    requests = []

    async def serve(reader, writer):
        while True:
            try:
                requests.append(await reader.readuntil(b"\r\n\r\n"))
            except asyncio.IncompleteReadError:
                return
            body = b'{"detail": "the server is busy; try again in a moment"}'
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 30\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        stats = bench.new_stats()
        client = bench.closed_client("token", {"url": f"http://127.0.0.1:{port}"}, time.time() + 0.5, stats,
                                     random.Random(0), honour_retry_after=True)
        try:
            await asyncio.wait_for(client, timeout=1.5)  # waiting out the Retry-After, past its phase's end
        except asyncio.TimeoutError:
            pass
        server.close()
        return stats

    stats = asyncio.run(main())
    assert len(requests) == 1 and dict(stats["errors"]) == {"next 503": 1} and stats["acked"] == []
    # the 503 is an answer of the overload row, not a task handed out: the next-task latency leaves it out
    assert len(stats["answer_ms"]) == 1 and stats["next_ms"] == []
