"""bench/annotation_load.py's client: a response that is not JSON (a plain-text 500) comes
back as an error status the bench counts, instead of ending the run with a traceback."""

from __future__ import annotations

import asyncio
import importlib.util

from annotation.devserver import REPO


def test_a_plain_text_error_page_is_returned_as_its_status():
    spec = importlib.util.spec_from_file_location("annotation_load", REPO / "bench" / "annotation_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

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
