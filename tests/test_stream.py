"""The stream: replay, resume, fan-out, isolation, heartbeats, shutdown, slow readers."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest
from conftest import (
    BOUND_S,
    PY,
    ClientFactory,
    ConfigFactory,
    Event,
    collect,
    eventually,
    follow,
    lines_of,
    read_sse,
    submit,
    wait_job,
)

from streamsvc.api import REGISTRY


def assert_whole_sequence(events: list[Event]) -> None:
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert events[0].event == "status" and events[0].data["status"] == "running"
    assert events[-1].event == "complete"


async def test_subscriber_after_completion_gets_everything_and_the_response_ends(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    client = await start(make_config({"lines": [PY, "lines.py", "50"]}))
    job_id = await submit(client, "lines")
    first = await follow(client, job_id)  # follows the job live to its end
    late = await follow(client, job_id)  # connects after it finished

    assert late == first
    assert_whole_sequence(late)
    assert lines_of(late) == [f"line {i}" for i in range(50)]
    assert late[-1].data["status"] == "completed"
    assert late[-1].data["output"] == lines_of(late)
    assert [e.data["seq"] for e in late if e.event == "output"] == list(range(2, 52))


async def test_stream_headers_and_retry_frame(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}, server={"retry_ms": 1500}))
    job_id = await submit(client, "hello")
    async with client.get(f"/api/stream/{job_id}") as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        first = await response.content.readline()
        assert first == b"retry: 1500\n"


async def test_resume_with_header_and_with_query(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"lines": [PY, "lines.py", "20"]}))
    job_id = await submit(client, "lines")
    everything = await follow(client, job_id)

    by_header = await follow(client, job_id, **{"Last-Event-ID": "7"})
    async with client.get(f"/api/stream/{job_id}?lastEventId=7") as response:
        by_query = await collect(response)

    assert by_header == by_query == everything[7:]
    assert by_header[0].id == 8


async def test_resume_after_the_last_event_of_a_finished_job_gets_nothing_and_a_days_retry(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    """Nothing will ever follow: an EventSource that reconnects anyway waits a day, not 2 s."""
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    job_id = await submit(client, "hello")
    everything = await follow(client, job_id)
    async with client.get(f"/api/stream/{job_id}", headers={"Last-Event-ID": str(everything[-1].id)}) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        assert await response.read() == f"retry: {24 * 3600 * 1000}\n\n".encode()


async def test_resume_past_the_end_of_a_running_job_waits_for_it_and_of_a_finished_one_is_a_409(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    """A running job may still reach the id; a finished one never will, so a client with an
    id from elsewhere is told, where a 200 would have it reconnect for nothing forever. One
    that waited for an id the job then never reached is told too, by a terminal `error`."""
    gate = tmp_path / "gate"
    client = await start(make_config({"gate": [PY, "gate.py", str(gate)]}))
    job_id = await submit(client, "gate")
    await wait_job(client, job_id, {"outputLines": 1})  # events 1 and 2: running, "waiting"
    ahead = await client.get(f"/api/stream/{job_id}", headers={"Last-Event-ID": "3"})
    beyond = await client.get(f"/api/stream/{job_id}", headers={"Last-Event-ID": "100"})
    assert ahead.status == beyond.status == 200
    gate.touch()  # then 3: "released", 4: status, 5: complete
    events = await collect(ahead)
    assert [(e.id, e.event) for e in events] == [(4, "status"), (5, "complete")]
    assert await collect(beyond) == [
        Event(None, "error", {"message": "Last-Event-ID 100 is past the job's last event (5)"})
    ]
    for resume in ({"headers": {"Last-Event-ID": "6"}}, {"params": {"lastEventId": "1000"}}):
        response = await client.get(f"/api/stream/{job_id}", **resume)  # type: ignore[arg-type]
        assert response.status == 409, await response.text()
        error = (await response.json())["error"]
        assert error["code"] == "past_last_event" and "last event (5)" in error["message"], error


async def test_an_http_1_0_peer_asking_for_keep_alive_still_sees_each_body_end(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    """A body without length or chunks ends only with its connection."""
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    job_id = await submit(client, "hello")
    for path in (f"/api/stream/{job_id}", f"/api/jobs/{job_id}/log"):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), BOUND_S)  # to the end of the connection
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200") and b"keep-alive" not in head.lower(), head
        assert body.endswith(b"hello\nworld\n" if path.endswith("/log") else b"\n\n"), body[-80:]
        assert b"event: complete" in body or path.endswith("/log")


async def test_a_stream_request_with_a_body_is_refused(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    job_id = await submit(client, "hello")
    response = await client.get(f"/api/stream/{job_id}", data=b"x" * 100)
    assert response.status == 400
    assert (await response.json())["error"]["message"] == "a stream request has no body"


async def test_stopping_cuts_a_reader_still_behind_in_a_finished_jobs_log(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    """The service stops at once: a reader that has not taken the whole log is cut off (it
    resumes after the restart) and leaves nothing open behind."""
    big_tool = [PY, "-c", "for i in range(100000): print(f'{i:08} ' + 'x' * 200)"]  # more than socket buffers hold
    client = await start(make_config({"big": big_tool}))
    job_id = await submit(client, "big")
    await follow(client, job_id)
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port, limit=1 << 16)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    writer.write(f"GET /api/stream/{job_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    registry = client.app[REGISTRY]
    await eventually(lambda: registry.count() == 1, "the session has taken the connection")
    await client.close()  # the service stops while the reader is far behind
    assert registry.count() == 0
    raw = await asyncio.wait_for(reader.read(), BOUND_S)  # the connection ends
    writer.close()
    assert not raw.endswith(b"0\r\n\r\n")  # cut, not ended: the client knows to resume


async def test_a_streams_connection_ends_with_it_as_its_head_says(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    """The session, not aiohttp, owns a stream's connection after its head: no second request
    can follow on it, so the head says close, and the last chunk is followed by the close."""
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    job_id = await submit(client, "hello")
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    writer.write(f"GET /api/stream/{job_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())  # keep-alive by default
    raw = await asyncio.wait_for(reader.read(), BOUND_S)  # to the end of the connection
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"\r\nconnection: close" in head.lower(), head
    assert b"event: complete" in unchunk(body)  # strictly framed, ending with the last chunk


async def test_a_log_removed_by_retention_while_read_cuts_the_connection_not_the_body(
    make_config: ConfigFactory, start: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The text log and a stream of a job retention removes mid-read end as broken
    connections: a cut body never looks whole (and never carries a second response)."""
    big_tool = [PY, "-c", "for i in range(100000): print(f'{i:08} ' + 'x' * 200)"]  # more than socket buffers hold
    config = make_config({"big": big_tool, "hello": [PY, "hello.py"]}, server={"retention_jobs": 1})
    client = await start(config)
    big = await submit(client, "big")
    await follow(client, big)
    readers = []
    for path in (f"/api/jobs/{big}/log", f"/api/stream/{big}"):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port, limit=1 << 16)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # it falls behind at once
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        readers.append((reader, writer))
    await follow(client, await submit(client, "hello"))  # retention removes the big job
    assert (await client.get(f"/api/jobs/{big}")).status == 404
    for reader, writer in readers:
        raw = await asyncio.wait_for(reader.read(), BOUND_S)  # to the end of the connection
        writer.close()
        assert not raw.endswith(b"0\r\n\r\n"), raw[-200:]  # no last chunk: the client sees the cut
        assert b"HTTP/1.1 500" not in raw
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # and nothing went wrong


async def test_a_log_that_cannot_be_read_is_a_503_not_a_500(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    config = make_config({"hello": [PY, "hello.py"]})
    client = await start(config)
    job_id = await submit(client, "hello")
    await follow(client, job_id)
    await client.close()  # the next service has the log in no cache: it reads the file
    log_file = tmp_path / "data" / "jobs" / f"{job_id}.log"
    log_file.unlink()
    log_file.mkdir()  # no file to read, as on a failing disk
    again = await start(config)
    for path in (f"/api/stream/{job_id}", f"/api/jobs/{job_id}/log"):
        response = await again.get(path)
        assert response.status == 503, await response.text()
        error = (await response.json())["error"]
        assert error["code"] == "storage_unavailable" and "cannot read the job's log" in error["message"], error


async def test_live_subscriber_sees_lines_before_the_job_ends(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    client = await start(make_config({"gate": [PY, "gate.py", str(gate)]}))
    job_id = await submit(client, "gate")
    async with client.get(f"/api/stream/{job_id}") as response:
        events = read_sse(response)
        seen: list[Event] = []
        async for item in events:
            if isinstance(item, Event):
                seen.append(item)
                if item.event == "output":
                    break
        assert seen[-1].data["line"] == "waiting"
        gate.touch()  # only now may the job finish
        rest = [item async for item in events if isinstance(item, Event)]
    assert lines_of(seen + rest) == ["waiting", "released"]
    assert_whole_sequence(seen + rest)


async def test_twenty_subscribers_see_identical_sequences(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    script = (
        "import os, time\n"
        "for i in range(200): print('n', i)\n"
        "print('mid', flush=True)\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
        "for i in range(200): print('m', i)\n"
    )
    client = await start(make_config({"two-phase": [PY, "-c", script]}))
    job_id = await submit(client, "two-phase")

    async def subscriber() -> list[Event]:
        return await follow(client, job_id)

    tasks = [asyncio.create_task(subscriber()) for _ in range(20)]
    assert client.app is not None
    registry = client.app[REGISTRY]
    await eventually(lambda: registry.count(job_id) == 20, "twenty subscribers connected")
    gate.touch()
    results = await asyncio.gather(*tasks)

    assert all(result == results[0] for result in results)
    assert len(lines_of(results[0])) == 401
    assert_whole_sequence(results[0])


async def test_two_concurrent_jobs_never_mix(make_config: ConfigFactory, start: ClientFactory) -> None:
    a = "for i in range(2000): print(f'A {i}')"
    b = "import sys\nfor i in range(2000): print(f'B {i}', file=sys.stderr)"
    client = await start(make_config({"a": [PY, "-c", a], "b": [PY, "-c", b]}, queue={"workers": 2}))
    job_a, job_b = await submit(client, "a"), await submit(client, "b")
    events_a, events_b = await asyncio.gather(follow(client, job_a), follow(client, job_b))

    assert lines_of(events_a) == [f"A {i}" for i in range(2000)]
    assert lines_of(events_b) == [f"B {i}" for i in range(2000)]
    assert {e.data["stream"] for e in events_b if e.event == "output"} == {"stderr"}
    assert events_a[-1].data["jobId"] == job_a and events_b[-1].data["jobId"] == job_b


async def test_unknown_job_is_404_json(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({}))
    response = await client.get("/api/stream/00000000-0000-4000-8000-000000000000")
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "unknown_job"


async def test_nonsense_last_event_id_is_400(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    job_id = await submit(client, "hello")
    for value in ("abc", "-1", "1.5", "9" * 40, "٣"):
        response = await client.get(f"/api/stream/{job_id}", headers={"Last-Event-ID": value})
        assert response.status == 400, value
        assert (await response.json())["error"]["type"] == "user_error"


async def test_heartbeat_comments_while_the_job_is_silent(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    tool = {"argv": [PY, "gate.py", str(gate)], "heartbeat_s": 0.05}
    client = await start(make_config({"gate": tool}))
    job_id = await submit(client, "gate")
    async with client.get(f"/api/stream/{job_id}") as response:
        comments = 0
        async for item in read_sse(response):
            if isinstance(item, str):
                comments += 1
                if comments == 3:
                    break
        gate.touch()
    assert comments == 3


async def test_heartbeats_keep_coming_while_the_job_prints(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    chatter = f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    print('tick', flush=True)\n"
    chatter += "    time.sleep(0.01)"
    client = await start(make_config({"chatter": {"argv": [PY, "-c", chatter], "heartbeat_s": 0.1}}))
    job_id = await submit(client, "chatter")
    seen: list[str] = []
    try:
        async with asyncio.timeout(BOUND_S), client.get(f"/api/stream/{job_id}") as response:
            async for item in read_sse(response):
                seen.append(item if isinstance(item, str) else item.event)
                if seen.count("output") > 0 and seen[seen.index("output") :].count(": ping") == 3:
                    gate.touch()
    finally:
        gate.touch()
    between = seen[seen.index("output") : len(seen) - seen[::-1].index("output")]
    assert between.count(": ping") >= 2  # comments came between output lines, not only in silence
    assert seen[-1] == "complete"


def tasks_beside_aiohttps() -> list[str]:
    """The running tasks other than aiohttp's own for each connection and its handler."""
    names = [task.get_coro().__qualname__ for task in asyncio.all_tasks()]  # type: ignore[union-attr]
    return [name for name in names if name not in {"RequestHandler.start", "RequestHandler._handle_request"}]


async def test_an_open_stream_adds_no_task_of_its_own(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    client = await start(make_config({"gate": [PY, "gate.py", str(gate)]}))
    job_id = await submit(client, "gate")
    assert client.app is not None
    registry = client.app[REGISTRY]
    await wait_job(client, job_id, {"outputLines": 1})  # the tool runs: its job's tasks are there
    before = sorted(tasks_beside_aiohttps())
    responses = [await client.get(f"/api/stream/{job_id}") for _ in range(20)]
    await eventually(lambda: registry.count(job_id) == 20, "twenty subscribers connected")
    for response in responses:  # each has its first bytes: its handler is past start-up
        await response.content.readline()
    assert sorted(tasks_beside_aiohttps()) == before  # no ping, watcher or timer task per stream
    gate.touch()
    for response in responses:
        response.close()


async def test_disconnect_releases_the_session(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    client = await start(make_config({"gate": [PY, "gate.py", str(gate)]}))
    job_id = await submit(client, "gate")
    response = await client.get(f"/api/stream/{job_id}")
    await response.content.readline()
    assert client.app is not None
    registry = client.app[REGISTRY]
    assert registry.count(job_id) == 1
    response.close()
    await eventually(lambda: registry.count(job_id) == 0, "the session released")
    gate.touch()
    assert lines_of(await follow(client, job_id)) == ["waiting", "released"]


async def test_a_subscriber_that_reads_nothing_slows_no_one_and_catches_up_later(
    make_config: ConfigFactory, start: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    script = "import sys\nfor i in range(60000): sys.stdout.write(f'{i:08d} ' + 'x' * 90 + '\\n')"
    client = await start(make_config({"flood": [PY, "-c", script]}))
    job_id = await submit(client, "flood")
    # a raw socket with a tiny receive buffer that reads nothing while the job writes ~6 MB
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", client.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET /api/stream/{job_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()

    fast = await follow(client, job_id)  # a reading subscriber gets everything to the end
    job = (await (await client.get(f"/api/jobs/{job_id}")).json())["data"]
    assert job["status"] == "completed"  # the job ended while the silent reader held its stream
    assert len(lines_of(fast)) == 60000

    body = bytearray()  # now the silent one reads: it catches up from the log, nothing lost
    while not body.endswith(b"0\r\n\r\n"):
        chunk = await reader.read(1 << 16)
        assert chunk, "connection closed before the end"
        body += chunk
    assert await asyncio.wait_for(reader.read(), BOUND_S) == b""  # then the service closes it ...
    writer.close()
    assert body.count(b"event: output") == 60000
    assert b'"line":"00059999 ' in body
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]  # ... cleanly


async def test_live_bytes_on_the_wire_equal_a_replay_in_http_1_1_and_1_0(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    """Live events go out from the log's append or from the session's pump (after a flush);
    either way each HTTP/1.1 chunk is framed right, and an HTTP/1.0 peer gets the plain body."""
    gate = tmp_path / "gate"
    script = "import os,time\nprint('waiting', flush=True)\n"
    script += f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
    script += "for i in range(500): print(f'line {i}', flush=i % 7 == 0)\n"
    client = await start(make_config({"paced": [PY, "-c", script]}))
    job_id = await submit(client, "paced")
    await wait_job(client, job_id, {"outputLines": 1})
    peers = {}
    for version in ("1.1", "1.0"):
        reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
        writer.write(f"GET /api/stream/{job_id} HTTP/{version}\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(f"HTTP/{version} 200".encode())
        peers[version] = reader, writer
    gate.touch()
    bodies = {}
    for version, (reader, writer) in peers.items():
        raw = await asyncio.wait_for(reader.read(), BOUND_S)  # to the end of the connection
        writer.close()
        bodies[version] = unchunk(raw) if version == "1.1" else raw
    async with client.get(f"/api/stream/{job_id}") as late:
        replay = await late.read()
    assert b'"line":"line 499"' in replay
    assert bodies["1.1"] == replay
    assert bodies["1.0"] == replay


def unchunk(raw: bytes) -> bytes:
    """A chunked HTTP/1.1 body, strictly: each size line, its data, its CRLF, then the last chunk."""
    body, pos = bytearray(), 0
    while True:
        line_end = raw.index(b"\r\n", pos)
        size = int(raw[pos:line_end], 16)
        data_end = line_end + 2 + size
        assert raw[data_end : data_end + 2] == b"\r\n", f"chunk at {pos} is not closed by CRLF"
        body += raw[line_end + 2 : data_end]
        pos = data_end + 2
        if size == 0:
            assert pos == len(raw), "bytes after the last chunk"
            return bytes(body)
