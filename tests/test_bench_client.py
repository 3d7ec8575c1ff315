"""scripts/bench_client.py: the bench's own HTTP/1.1 reading, against real servers.

The bench's figures are only as good as its client: a decoder that dropped or doubled bytes
at a read's edge would count lines lost (or not), and a jobrate client that missed a
`complete` would count a job lost.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import PY, ClientFactory, ConfigFactory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_client

#: what the server writes, one `write` (one chunk) each: empty writes send nothing
WRITES = [b"id: 1\nevent: output\ndata: {}\n\n", b"x" * 70_000, b"\r\n", b"0\r\n\r\n", b"", b"last"]


async def chunked_response() -> bytes:
    """A real aiohttp server's chunked response to WRITES, as bytes off the socket."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for data in WRITES:
            await response.write(data)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    async with TestServer(app, host="127.0.0.1") as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    return raw


async def test_a_chunked_body_is_decoded_the_same_however_its_reads_fall() -> None:
    raw = await chunked_response()
    head, _, body = raw.partition(b"\r\n\r\n")
    status, chunks = bench_client._parse_head(head)
    assert status == 200 and chunks is not None
    assert body.endswith(b"0\r\n\r\n")  # the last chunk, after the data that looks like one
    expected = b"".join(WRITES)
    cuts = [*range(0, 40), *range(40, len(body), 997), *range(len(body) - 40, len(body) + 1)]
    for cut in cuts:
        decoder = bench_client._Dechunker()
        first = decoder.feed(body[:cut])
        assert decoder.ended == (cut >= len(body) - 2)  # at the last chunk, "0\r\n" (no trailer)
        assert first + decoder.feed(body[cut:]) == expected, cut
        assert decoder.ended
    decoder = bench_client._Dechunker()
    assert b"".join(decoder.feed(body[i : i + 1]) for i in range(len(body))) == expected
    assert decoder.ended


def test_a_head_without_chunking_gives_no_decoder() -> None:
    assert bench_client._parse_head(b"HTTP/1.0 404 Not Found\r\nContent-Length: 3") == (404, None)


@pytest.mark.parametrize(("script", "succeeded"), [("pass", True), ("raise SystemExit(3)", False)])
async def test_the_jobrate_client_follows_each_job_to_its_complete(
    start: ClientFactory, make_config: ConfigFactory, script: str, succeeded: bool
) -> None:
    client = await start(make_config({"tool": [PY, "-c", f"print('hi'); {script}"]}))
    work = bench_client.JobsWork(f"http://127.0.0.1:{client.port}", "tool", "proj", jobs=3, clients=3)
    results = await asyncio.gather(*(bench_client._submit_and_follow_on(work) for _ in range(work.jobs)))
    assert all(completed > 0 for completed, _ in results)
    assert [ok for _, ok in results] == [succeeded] * 3


async def test_the_jobrate_client_refuses_an_answer_it_cannot_follow() -> None:
    # an answer that closes the connection cannot be followed by the job's stream on it
    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"data": {"jobId": "x"}}, headers={"Connection": "close"})

    app = web.Application()
    app.router.add_post("/api/execute", handler)
    async with TestServer(app, host="127.0.0.1") as server:
        work = bench_client.JobsWork(f"http://127.0.0.1:{server.port}", "tool", "proj", jobs=1, clients=1)
        with pytest.raises(ValueError, match="no keep-alive"):
            await bench_client._submit_and_follow_on(work)


def test_nothing_listens_is_a_connection_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connecting is refused
        work = bench_client.JobsWork(f"http://127.0.0.1:{sock.getsockname()[1]}", "tool", "proj", jobs=1, clients=1)
        with pytest.raises(OSError):
            asyncio.run(bench_client._submit_and_follow_on(work))
