"""streamsvc.client: the SSE parser on every way a stream can be cut into chunks, and `follow`
against servers that misbehave in ways the real one does not (so the client's own guards show)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web

from streamsvc import client as client_module
from streamsvc.client import Client, ClientError, Event, SSEParser, Unreachable

STREAM = (
    b"retry: 1500\n\n"
    b": heartbeat\n"
    b'id: 1\nevent: status\ndata: {"status": "running"}\n\n'
    b'id: 2\r\nevent: output\r\ndata: {"line": "caf\xc3\xa9",\r\ndata:  "stream": "stdout"}\r\n\r\n'
    b'id: 3\revent: output\rdata:{"line": "x"}\r\r'
    b"event: nothing\n\n"
    b"data: not json\n\n"
    b'id: 4\nevent: complete\ndata: {"status": "completed"}\n\n'
)
EXPECTED = [
    Event("status", {"status": "running"}, 1),
    Event("output", {"line": "café", "stream": "stdout"}, 2),
    Event("output", {"line": "x"}, 3),
    Event("message", "not json", None),
    Event("complete", {"status": "completed"}, 4),
]


def parse(chunks: list[bytes]) -> tuple[list[Event], SSEParser]:
    parser = SSEParser()
    return [event for chunk in chunks for event in parser.feed(chunk)], parser


def test_parser_reads_lf_crlf_and_cr_lines_multi_line_data_comments_and_retry() -> None:
    events, parser = parse([STREAM])
    assert events == EXPECTED
    assert parser.retry_ms == 1500
    assert parser.comments == 1


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_parser_gives_the_same_events_however_the_bytes_are_split(size: int) -> None:
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]  # CRLF and UTF-8 split too
    assert parse(chunks)[0] == EXPECTED


def test_parser_refuses_an_event_beyond_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "MAX_EVENT_CHARS", 100)
    parser = SSEParser()
    with pytest.raises(ClientError, match="exceeds 100 characters"):
        for _ in range(20):
            parser.feed(b"data: " + b"x" * 10 + b"\n")
    with pytest.raises(ClientError, match="exceeds 100 characters"):
        SSEParser().feed(b"data: " + b"y" * 200)  # one line, no end yet


def frame(seq: int, event: str, data: dict[str, Any]) -> bytes:
    return f"id: {seq}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode()


Answer = Callable[[int], web.StreamResponse | bytes]


async def serve_stream(aiohttp_server: Any, answer: Answer, status: str = "running") -> tuple[str, list[str]]:
    """A server whose n-th stream request gets `answer(n)` (bytes: a 200 stream that then ends),
    and whose job has `status`; its URL and the Last-Event-ID of every stream request."""
    seen: list[str] = []

    async def job(request: web.Request) -> web.Response:
        return web.json_response({"data": {"jobId": request.match_info["job"], "status": status}})

    async def stream(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Last-Event-ID", ""))
        body = answer(len(seen))
        if isinstance(body, web.StreamResponse):
            return body
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"retry: 10\n\n" + body)
        return response

    app = web.Application()
    app.router.add_get("/api/stream/{job}", stream)
    app.router.add_get("/api/jobs/{job}", job)
    server = await aiohttp_server(app)
    return str(server.make_url("")), seen


async def test_follow_resumes_after_ends_and_5xx_and_yields_each_event_once(aiohttp_server: Any) -> None:
    events = [frame(1, "status", {"status": "running"}), frame(2, "output", {"line": "a"}),
              frame(3, "output", {"line": "b"}), frame(4, "complete", {"status": "completed"})]  # fmt: skip

    def answer(n: int) -> web.StreamResponse | bytes:
        if n == 2:
            return web.json_response({"error": {"code": "x", "message": "busy"}}, status=503)
        return b"".join(events[: min(n, 4)])  # every answer replays from 1, ignoring Last-Event-ID

    url, seen = await serve_stream(aiohttp_server, answer)
    async with Client(url) as api:
        got = [event async for event in api.follow("job")]
    assert [e.id for e in got] == [1, 2, 3, 4]
    assert [e.event for e in got] == ["status", "output", "output", "complete"]
    assert seen == ["0", "1", "1", "3"]  # the 503 changed nothing: the next asks again after 1


async def test_follow_starts_after_the_given_event(aiohttp_server: Any) -> None:
    url, seen = await serve_stream(aiohttp_server, lambda n: frame(3, "output", {}) + frame(4, "complete", {}))
    async with Client(url) as api:
        got = [event.id async for event in api.follow("job", last_event_id=3)]
    assert (got, seen) == ([4], ["3"])


async def test_follow_after_the_end_of_a_finished_job_yields_nothing(aiohttp_server: Any) -> None:
    url, seen = await serve_stream(aiohttp_server, lambda n: b"", status="completed")
    async with Client(url) as api:
        got = [event async for event in api.follow("job", last_event_id=9)]
    assert (got, seen) == ([], ["9"])


async def test_follow_gives_up_when_nothing_comes_within_its_bound(aiohttp_server: Any) -> None:
    url, seen = await serve_stream(aiohttp_server, lambda n: frame(1, "status", {}) if n == 1 else b"")
    async with Client(url, give_up_s=0.2) as api:
        got: list[Event] = []
        with pytest.raises(Unreachable, match="lost the stream of job job: the stream ended before the job did"):
            async for event in api.follow("job"):
                got.append(event)
    assert [e.id for e in got] == [1]
    assert len(seen) > 2
    assert set(seen[1:]) == {"1"}


async def test_follow_ends_at_once_on_an_error_answer_or_an_unreachable_service(aiohttp_server: Any) -> None:
    def answer(n: int) -> web.StreamResponse:
        body = {"error": {"type": "user_error", "code": "unknown_job", "message": "unknown job: 'job'"}}
        return web.json_response(body, status=404)

    url, _ = await serve_stream(aiohttp_server, answer)
    async with Client(url) as api:
        with pytest.raises(ClientError) as caught:
            _ = [event async for event in api.follow("job")]
    assert (caught.value.status, caught.value.code, caught.value.message) == (404, "unknown_job", "unknown job: 'job'")
    async with Client("http://127.0.0.1:1") as api:
        with pytest.raises(Unreachable, match=r"cannot reach the service at http://127\.0\.0\.1:1"):
            _ = [event async for event in api.follow("job")]
