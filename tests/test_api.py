"""The HTTP surface: envelope, validation, job records, listing, the plain log, tools, projects, auth."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from conftest import (
    BOUND_S,
    PY,
    UNKNOWN_JOB,
    Client,
    ClientFactory,
    ConfigFactory,
    collect,
    data_of,
    eventually,
    follow,
    get_data,
    job_of,
    lines_of,
    read_sse,
    submit,
    submit_running,
    wait_job,
    write_project,
)

from streamsvc.api import MAX_ID_CHARS, MAX_JSON_BYTES, MAX_LIST_LIMIT

JOB_FIELDS = {
    "jobId": str,
    "toolId": str,
    "projectId": str,
    "status": str,
    "createdAt": str | None,
    "startedAt": str | None,
    "completedAt": str | None,
    "exitCode": int | None,
    "signal": str | None,
    "durationMs": int | None,
    "outputLines": int,
    "outputBytes": int,
    "truncated": bool,
    "queuePosition": int | None,
    "estimatedWaitMs": int | None,
}
STATUSES = {"queued", "running", "completed", "failed", "timeout", "cancelled", "lost"}
#: writes "out 1" (stdout), "err 1" (stderr), "out 2" (stdout), each only once the test has
#: seen the line before, so the order they reach the service is fixed
INTERLEAVED = """
import os, sys, time
def wait(name):
    while not os.path.exists(os.path.join(sys.argv[1], name)):
        time.sleep(0.01)
print("out 1", flush=True)
wait("g1")
print("err 1", file=sys.stderr, flush=True)
wait("g2")
print("out 2", flush=True)
"""
TOKEN = "s3cret-token"


# --- helpers ----------------------------------------------------------------------------


async def error_of(response: ClientResponse, status: int, code: str | None = None) -> dict[str, Any]:
    """The `error` of an error envelope, after checking its shape, status and code."""
    text = await response.text()
    assert response.status == status, text
    assert response.content_type == "application/json", text
    body = json.loads(text)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"type", "code", "message"}, error
    assert error["type"] == ("user_error" if status < 500 else "system_error"), error
    assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", error["code"]), error
    assert isinstance(error["message"], str) and error["message"], error
    assert "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


async def post_json(client: Client, body: bytes, content_type: str = "application/json") -> ClientResponse:
    return await client.post("/api/execute", data=body, headers={"Content-Type": content_type})


async def job_count(client: Client) -> int:
    return len(await get_data(client, "/api/jobs"))


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    assert moment.utcoffset() == timedelta(0), text
    return moment


def assert_job_shape(job: dict[str, Any]) -> None:
    for name, kind in JOB_FIELDS.items():
        assert name in job, name
        assert isinstance(job[name], kind), (name, job[name])
        assert not (kind is int and isinstance(job[name], bool)), name
    assert job["status"] in STATUSES
    assert str(uuid.UUID(job["jobId"])) == job["jobId"]
    for name in ("createdAt", "startedAt", "completedAt"):
        if job[name] is not None:
            parse_time(job[name])


# --- the envelope and routing -----------------------------------------------------------


async def test_every_success_body_is_an_envelope(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    job_id = await submit(client, "hello")
    await follow(client, job_id)

    for path in ("/api/jobs", f"/api/jobs/{job_id}", "/api/queue/status", "/api/tools", "/api/projects", "/healthz"):
        await data_of(await client.get(path))
    body = json.dumps({"toolId": "hello", "projectId": "proj"}).encode()
    accepted = await data_of(await post_json(client, body), status=202)
    await follow(client, accepted["jobId"])


async def test_unknown_routes_and_methods_get_the_envelope(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({}))
    await error_of(await client.get("/nope"), 404, "not_found")
    await error_of(await client.get("/api/nope"), 404, "not_found")
    await error_of(await client.get(f"/api/jobs/{UNKNOWN_JOB}/nope"), 404, "not_found")
    await error_of(await client.post("/api/jobs"), 405, "method_not_allowed")
    await error_of(await client.put("/api/execute"), 405, "method_not_allowed")
    await error_of(await client.get("/api/execute"), 405, "method_not_allowed")
    await error_of(await client.delete("/healthz"), 405, "method_not_allowed")


async def test_405_names_the_allowed_methods(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({}))
    response = await client.put("/api/execute")
    await error_of(response, 405, "method_not_allowed")
    assert "POST" in response.headers.get("Allow", "")


# --- POST /api/execute ------------------------------------------------------------------


async def test_execute_answers_202_before_the_job_starts(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    tools = {"gate": [PY, "gate.py", str(gate)], "hello": [PY, "hello.py"]}
    client = await start(make_config(tools, queue={"workers": 1}))
    await submit_running(client, "gate")

    response = await client.post("/api/execute", json={"toolId": "hello", "projectId": "proj"})
    accepted = await data_of(response, status=202)

    job_id = accepted["jobId"]
    assert uuid.UUID(job_id).version == 4 and str(uuid.UUID(job_id)) == job_id
    assert accepted == {
        "jobId": job_id,
        "status": "queued",
        "streamUrl": f"/api/stream/{job_id}",
        "jobUrl": f"/api/jobs/{job_id}",
    }
    assert response.headers["Location"] == f"/api/jobs/{job_id}"
    job = await get_data(client, accepted["jobUrl"])
    assert job["status"] == "queued" and job["startedAt"] is None and job["queuePosition"] == 1
    async with client.get(accepted["streamUrl"]) as stream:
        assert stream.status == 200
        gate.touch()
        events = await collect(stream)
    assert lines_of(events) == ["hello", "world"]
    assert events[-1].data["status"] == "completed"


async def test_each_job_gets_its_own_id(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    ids = [await submit(client, "hello") for _ in range(5)]
    assert len(set(ids)) == 5
    for job_id in ids:
        assert (await follow(client, job_id))[-1].data["jobId"] == job_id


BAD_BODIES = {
    "malformed": b'{"toolId": "hello", "projectId": ',
    "empty": b"",
    "trailing-garbage": b'{"toolId": "hello", "projectId": "proj"} x',
    "not-utf8": b'{"toolId": "hello", "projectId": "pr\xffoj"}',
    "array": b'["hello", "proj"]',
    "string": b'"hello"',
    "null": b"null",
    "number": b"42",
    "missing-project": b'{"toolId": "hello"}',
    "missing-tool": b'{"projectId": "proj"}',
    "empty-object": b"{}",
    "tool-number": b'{"toolId": 1, "projectId": "proj"}',
    "project-list": b'{"toolId": "hello", "projectId": ["proj"]}',
    "project-null": b'{"toolId": "hello", "projectId": null}',
    "tool-bool": b'{"toolId": true, "projectId": "proj"}',
    "tool-object": b'{"toolId": {"id": "hello"}, "projectId": "proj"}',
    "tool-empty": b'{"toolId": "", "projectId": "proj"}',
    "unknown-field": b'{"toolId": "hello", "projectId": "proj", "args": ["-x"]}',
    "unknown-field-null": b'{"toolId": "hello", "projectId": "proj", "priority": null}',
    "nul-escaped-tool": b'{"toolId": "hello\\u0000", "projectId": "proj"}',
    "nul-escaped-project": b'{"toolId": "hello", "projectId": "proj\\u0000"}',
    "nul-raw": b'{"toolId": "hello\x00", "projectId": "proj"}',
    "long-tool": json.dumps({"toolId": "h" * (MAX_ID_CHARS + 1), "projectId": "proj"}).encode(),
    "long-project": json.dumps({"toolId": "hello", "projectId": "p" * (MAX_ID_CHARS + 1)}).encode(),
    "huge-number": b'{"toolId": "hello", "projectId": ' + b"9" * 5000 + b"}",
    "deeply-nested": b"[" * 50_000,
    "deeply-nested-object": b'{"toolId": ' + b'{"a": ' * 5_000,
}


@pytest.mark.parametrize("body", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
async def test_bad_bodies_are_400_and_create_nothing(
    make_config: ConfigFactory, start: ClientFactory, body: bytes
) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    await error_of(await post_json(client, body), 400, "bad_request")
    assert await job_count(client) == 0


async def test_ids_of_the_longest_allowed_length_pass_validation(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    response = await client.post("/api/execute", json={"toolId": "h" * MAX_ID_CHARS, "projectId": "proj"})
    await error_of(response, 404, "unknown_tool")
    response = await client.post("/api/execute", json={"toolId": "hello", "projectId": "p" * MAX_ID_CHARS})
    await error_of(response, 404, "unknown_project")
    response = await client.post("/api/execute", json={"toolId": "hello", "projectId": "\u00e9" * MAX_ID_CHARS})
    await error_of(response, 404, "unknown_project")  # 400 bytes: longer than a file name may be


async def test_lone_surrogate_in_an_id_is_not_a_500(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    response = await post_json(client, b'{"toolId": "hello", "projectId": "\\ud800"}')
    assert response.status in (400, 404), await response.text()
    await error_of(response, response.status)


async def test_body_over_the_size_limit_is_413(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    core = json.dumps({"toolId": "hello", "projectId": "proj"}).encode()
    at_limit = core + b" " * (MAX_JSON_BYTES - len(core))
    assert len(at_limit) == MAX_JSON_BYTES

    await error_of(await post_json(client, at_limit + b" "), 413, "body_too_large")
    await error_of(await post_json(client, b"[" + b"0," * MAX_JSON_BYTES + b"0]"), 413, "body_too_large")
    assert await job_count(client) == 0
    job_id = (await data_of(await post_json(client, at_limit), status=202))["jobId"]
    assert lines_of(await follow(client, job_id)) == ["hello", "world"]


async def test_a_body_declared_over_the_size_limit_is_413_before_it_is_sent(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    """The answer comes from the declared length: a client that waits for it (`Expect:
    100-continue`, or one sending slowly) is not left waiting for a body it must not send."""
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    head, body = await part_of_a_submit(client, 10_000_000_000)
    assert head.startswith(b"HTTP/1.1 413 "), head
    assert body["error"]["code"] == "body_too_large", body
    assert await job_count(client) == 0


async def test_a_body_that_stops_coming_is_408(make_config: ConfigFactory, start: ClientFactory) -> None:
    """A client that stops sending does not hold its request open for ever."""
    client = await start(make_config({"hello": [PY, "hello.py"]}, server={"stream_stall_s": 0.2}))
    head, body = await part_of_a_submit(client, 100)
    assert head.startswith(b"HTTP/1.1 408 "), head
    assert body["error"] == {
        "type": "user_error",
        "code": "request_timeout",
        "message": "the request's body stalled: nothing came for 0.2 s",
    }
    assert await job_count(client) == 0


async def part_of_a_submit(client: Client, declared: int) -> tuple[bytes, Any]:
    """Send a submit's head declaring `declared` body bytes, then only a few; the answer's
    head and JSON body."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        writer.write(
            b"POST /api/execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {declared}\r\n\r\n".encode()
            + b'{"toolId": "hello"'
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
        length = int(re.search(rb"Content-Length: (\d+)", head)[1])  # type: ignore[index]
        return head, json.loads(await asyncio.wait_for(reader.readexactly(length), BOUND_S))
    finally:
        writer.close()


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml", ""])
async def test_body_that_is_not_json_is_415(
    make_config: ConfigFactory, start: ClientFactory, content_type: str
) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    body = json.dumps({"toolId": "hello", "projectId": "proj"}).encode()
    if content_type:
        response = await post_json(client, body, content_type)
    else:  # no Content-Type header at all
        response = await client.post("/api/execute", data=body, skip_auto_headers={"Content-Type"})
    await error_of(response, 415, "unsupported_media_type")
    assert await job_count(client) == 0


async def test_json_with_a_charset_parameter_is_accepted(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    body = json.dumps({"toolId": "hello", "projectId": "proj"}).encode()
    accepted = await data_of(await post_json(client, body, "application/json; charset=utf-8"), status=202)
    assert lines_of(await follow(client, accepted["jobId"])) == ["hello", "world"]


async def test_unknown_tool_is_404(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    for tool in ("nope", "HELLO", "hello ", "__class__", "../hello"):
        response = await client.post("/api/execute", json={"toolId": tool, "projectId": "proj"})
        await error_of(response, 404, "unknown_tool")
    assert await job_count(client) == 0


TRAVERSALS = [
    "..",
    ".",
    "../x",
    "../projects/proj",
    "proj/..",
    "proj/../proj",
    "proj/",
    "/etc",
    "/",
    "%2e%2e",
    "%2e%2e%2fx",
    "..\\x",
    ".x",
    "outside",
    "loop",
    "file.txt",
    "nope",
    "~",
]


@pytest.mark.parametrize("project", TRAVERSALS)
async def test_ids_outside_the_projects_root_are_unknown(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path, project: str
) -> None:
    config = make_config({"hello": [PY, "hello.py"]})
    root = tmp_path / "projects"
    write_project(tmp_path, "x")  # what "../x" would reach
    write_project(root, ".x")  # hidden
    write_project(tmp_path, "elsewhere")
    (root / "outside").symlink_to(tmp_path / "elsewhere")  # a symlink out of the root
    (root / "loop").symlink_to(root / "loop")
    (root / "file.txt").write_text("not a folder")
    (root / "proj" / "inner").mkdir()
    (root / "%2e%2e").symlink_to(tmp_path)  # even a literal name that is a link out
    client = await start(config)

    response = await client.post("/api/execute", json={"toolId": "hello", "projectId": project})
    await error_of(response, 404, "unknown_project")
    assert await job_count(client) == 0
    assert [p["projectId"] for p in await get_data(client, "/api/projects")] == ["proj"]


# --- unknown jobs and wrong states ------------------------------------------------------


@pytest.mark.parametrize(
    "job_id", [UNKNOWN_JOB, "nope", "..", "%2e%2e", "x" * 8000, str(uuid.uuid4()).upper()], ids=repr
)
async def test_unknown_job_is_404_on_every_job_route(
    make_config: ConfigFactory, start: ClientFactory, job_id: str
) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    known = await submit(client, "hello")
    await follow(client, known)
    for method, path in (
        ("GET", f"/api/jobs/{job_id}"),
        ("DELETE", f"/api/jobs/{job_id}"),
        ("GET", f"/api/jobs/{job_id}/log"),
        ("GET", f"/api/stream/{job_id}"),
    ):
        error = await error_of(await client.request(method, path), 404)
        assert error["code"] in ("unknown_job", "not_found"), (method, path, error)
        assert len(error["message"]) < 1000
    assert (await job_of(client, known))["status"] == "completed"


async def test_a_job_id_of_ten_thousand_characters_is_404_in_the_envelope(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    client = await start(make_config({}))
    await error_of(await client.get("/api/jobs/" + "a" * 10_000), 404, "unknown_job")


async def test_a_job_id_of_ten_thousand_characters_is_never_a_500(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    client = await start(make_config({}))
    for path in ("/api/jobs/", "/api/stream/"):
        response = await client.get(path + "a" * 10_000)
        assert 400 <= response.status < 500, await response.text()


async def test_cancelling_a_finished_job_is_409(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"], "fail": [PY, "both.py", "3"]}))
    for tool, status in (("hello", "completed"), ("fail", "failed")):
        job_id = await submit(client, tool)
        await follow(client, job_id)
        await error_of(await client.delete(f"/api/jobs/{job_id}"), 409, "job_finished")
        assert (await job_of(client, job_id))["status"] == status
        await error_of(await client.delete(f"/api/jobs/{job_id}"), 409, "job_finished")


async def test_full_queue_is_429_with_retry_after(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    tools = {"gate": [PY, "gate.py", str(gate)], "hello": [PY, "hello.py"]}
    client = await start(make_config(tools, queue={"workers": 1, "max_pending": 1}))
    await submit_running(client, "gate")
    queued = await submit(client, "hello")

    response = await client.post("/api/execute", json={"toolId": "hello", "projectId": "proj"})
    await error_of(response, 429, "queue_full")
    assert int(response.headers["Retry-After"]) >= 1
    assert await job_count(client) == 2

    gate.touch()
    assert (await follow(client, queued))[-1].data["status"] == "completed"
    again = await submit(client, "hello")  # room again once the queue drained
    assert (await follow(client, again))[-1].data["status"] == "completed"


# --- job records ------------------------------------------------------------------------


async def test_a_completed_job_has_every_field(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    job_id = await submit(client, "hello")
    await follow(client, job_id)
    job = await job_of(client, job_id)

    assert_job_shape(job)
    assert job["jobId"] == job_id and job["toolId"] == "hello" and job["projectId"] == "proj"
    assert job["status"] == "completed" and job["exitCode"] == 0 and job["signal"] is None
    assert job["outputLines"] == 2 and job["outputBytes"] == len("hello\nworld\n")
    assert job["truncated"] is False
    assert job["queuePosition"] is None and job["estimatedWaitMs"] is None
    created, started, completed = (parse_time(job[k]) for k in ("createdAt", "startedAt", "completedAt"))
    assert created <= started <= completed
    assert isinstance(job["durationMs"], int) and job["durationMs"] >= 0
    between_ms = (completed - started) / timedelta(milliseconds=1)
    assert abs(job["durationMs"] - between_ms) <= 1  # the same interval, each rounded to milliseconds
    assert await get_data(client, "/api/jobs") == [job]


async def test_a_running_jobs_output_counts_grow_as_it_prints(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    """A progress bar may follow either count while the job runs."""
    gate = tmp_path / "gate"
    client = await start(make_config({"gate": [PY, "gate.py", str(gate)]}))
    job_id = await submit(client, "gate")
    running = await wait_job(client, job_id, {"outputLines": 1})
    assert running["status"] == "running" and running["outputBytes"] == len("waiting\n")
    [listed] = await get_data(client, "/api/jobs")  # (its durationMs has grown meanwhile)
    assert (listed["outputLines"], listed["outputBytes"]) == (1, len("waiting\n"))
    gate.touch()
    await follow(client, job_id)
    done = await job_of(client, job_id)
    assert (done["outputLines"], done["outputBytes"]) == (2, len("waiting\nreleased\n"))


async def test_a_failed_job_reports_its_exit_code(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"fail": [PY, "both.py", "3"]}))
    job_id = await submit(client, "fail")
    await follow(client, job_id)
    job = await job_of(client, job_id)
    assert_job_shape(job)
    assert job["status"] == "failed" and job["exitCode"] == 3 and job["signal"] is None
    assert job["outputLines"] == 3 and job["completedAt"] is not None


async def test_queued_and_running_jobs_have_every_field(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    tools = {"gate": [PY, "gate.py", str(gate)], "hello": [PY, "hello.py"]}
    client = await start(make_config(tools, queue={"workers": 1}))
    running = await wait_job(client, await submit(client, "gate"), "running")
    queued = await job_of(client, await submit(client, "hello"))

    for job in (running, queued):
        assert_job_shape(job)
        assert job["completedAt"] is None and job["exitCode"] is None and job["signal"] is None
    assert running["startedAt"] is not None and running["queuePosition"] is None
    assert queued["startedAt"] is None and queued["durationMs"] is None
    assert queued["queuePosition"] == 1 and isinstance(queued["estimatedWaitMs"], int)
    gate.touch()
    await follow(client, queued["jobId"])


# --- GET /api/jobs ----------------------------------------------------------------------


async def test_jobs_are_listed_newest_first_with_filters(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    tools = {"hello": [PY, "hello.py"], "fail": [PY, "both.py", "1"], "gate": [PY, "gate.py", str(gate)]}
    client = await start(make_config(tools, queue={"workers": 1}))
    finished = []
    for tool in ("hello", "fail", "hello", "hello", "fail"):
        finished.append(await submit(client, tool))
        await follow(client, finished[-1])
    running = await submit_running(client, "gate")
    queued = await submit(client, "hello")

    every = [job["jobId"] for job in await get_data(client, "/api/jobs")]
    assert every == [queued, running, *reversed(finished)]

    async def ids(query: str) -> list[str]:
        return [job["jobId"] for job in await get_data(client, f"/api/jobs?{query}")]

    assert await ids("status=completed") == [finished[3], finished[2], finished[0]]
    assert await ids("status=failed") == [finished[4], finished[1]]
    assert await ids("status=running") == [running]
    assert await ids("status=queued") == [queued]
    assert await ids("status=cancelled") == []
    assert await ids("limit=2") == [queued, running]
    assert await ids("limit=1&status=completed") == [finished[3]]
    assert await ids(f"limit={MAX_LIST_LIMIT}") == every
    gate.touch()
    await follow(client, queued)


@pytest.mark.parametrize(
    "query",
    [
        "status=bogus",
        "status=COMPLETED",
        "status=",
        "limit=0",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        "limit=",
        f"limit={MAX_LIST_LIMIT + 1}",
        "limit=" + "9" * 40,
        "limit=%D9%A3",  # an Arabic-Indic digit three
    ],
)
async def test_bad_list_queries_are_400(make_config: ConfigFactory, start: ClientFactory, query: str) -> None:
    client = await start(make_config({}))
    await error_of(await client.get(f"/api/jobs?{query}"), 400, "bad_request")


# --- GET /api/jobs/{id}/log -------------------------------------------------------------


async def test_a_log_reader_that_takes_nothing_is_cut_off(
    make_config: ConfigFactory, start: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """As a stream's is, after `stream_stall_s`: it cannot hold its request open for ever."""
    caplog.set_level(logging.INFO, logger="streamsvc.api")
    big_tool = [PY, "-c", "for i in range(100000): print(f'{i:08} ' + 'x' * 200)"]  # more than socket buffers hold
    client = await start(make_config({"big": big_tool}, server={"stream_stall_s": 0.2}))
    job_id = await submit(client, "big")
    await follow(client, job_id)
    reader, writer = await asyncio.open_connection(client.host, client.port, limit=1 << 16)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    writer.write(f"GET /api/jobs/{job_id}/log HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    await eventually(lambda: f"the log of job {job_id} cut off" in caplog.text, "the reader is cut off")
    raw = await asyncio.wait_for(reader.read(), BOUND_S)  # what was sent before: then the end
    writer.close()
    assert not raw.endswith(b"0\r\n\r\n")  # cut, not ended
    assert len(raw) < 100000 * 209


async def test_log_is_the_whole_output_interleaved_in_arrival_order(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gates = tmp_path / "gates"
    gates.mkdir()
    client = await start(make_config({"mix": [PY, "-c", INTERLEAVED, str(gates)]}))
    job_id = await submit(client, "mix")
    async with client.get(f"/api/stream/{job_id}") as response:
        async for item in read_sse(response):
            if isinstance(item, str) or item.event != "output":
                continue
            if item.data["line"] == "out 1":
                (gates / "g1").touch()
            elif item.data["line"] == "err 1":
                (gates / "g2").touch()

    response = await client.get(f"/api/jobs/{job_id}/log")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert await response.text() == "out 1\nerr 1\nout 2\n"


async def test_log_of_a_large_output_is_complete_and_in_order(make_config: ConfigFactory, start: ClientFactory) -> None:
    script = "for i in range(20000): print(f'line {i} \\u00e9\\u2713')"
    client = await start(make_config({"many": [PY, "-c", script]}))
    job_id = await submit(client, "many")
    events = await follow(client, job_id)

    response = await client.get(f"/api/jobs/{job_id}/log")
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    text = (await response.read()).decode("utf-8")
    assert text == "".join(f"line {i} \u00e9\u2713\n" for i in range(20000))
    assert text.splitlines() == lines_of(events)


async def test_log_of_a_job_without_output_is_empty(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    tools = {"gate": [PY, "gate.py", str(gate)], "quiet": [PY, "-c", "pass"]}
    client = await start(make_config(tools, queue={"workers": 1}))
    running = await submit_running(client, "gate")
    queued = await submit(client, "quiet")
    response = await client.get(f"/api/jobs/{queued}/log")
    assert response.status == 200 and await response.text() == ""
    gate.touch()
    await follow(client, queued)
    assert await (await client.get(f"/api/jobs/{queued}/log")).text() == ""
    assert await (await client.get(f"/api/jobs/{running}/log")).text() == "waiting\nreleased\n"


# --- tools, projects, health, openapi ---------------------------------------------------


async def test_tools_lists_id_description_and_timeout(make_config: ConfigFactory, start: ClientFactory) -> None:
    tools = {
        "hello": {"argv": [PY, "hello.py"], "description": "Say hello", "timeout_s": 120},
        "plain": [PY, "hello.py"],
        "quick": {"argv": [PY, "hello.py"], "timeout_s": 1.5},
    }
    client = await start(make_config(tools, limits={"timeout_s": 30}))
    listed = await get_data(client, "/api/tools")
    assert sorted(listed, key=lambda tool: tool["id"]) == [
        {"id": "hello", "description": "Say hello", "timeoutMs": 120_000},
        {"id": "plain", "description": "", "timeoutMs": 30_000},
        {"id": "quick", "description": "", "timeoutMs": 1_500},
    ]


async def test_no_tools_is_an_empty_list(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({}))
    assert await get_data(client, "/api/tools") == []


async def test_projects_lists_the_folders_of_the_root(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    config = make_config({"hello": [PY, "hello.py"]})
    root = tmp_path / "projects"
    write_project(root, "beta")
    write_project(root, "alpha")
    write_project(root, ".hidden")
    (root / "notes.txt").write_text("a file, not a project")
    write_project(tmp_path, "elsewhere")
    (root / "escape").symlink_to(tmp_path / "elsewhere")
    client = await start(config)

    projects = await get_data(client, "/api/projects")
    assert sorted(p["projectId"] for p in projects) == ["alpha", "beta", "proj"]
    for project in ("alpha", "beta"):
        response = await client.post("/api/execute", json={"toolId": "hello", "projectId": project})
        job_id = (await data_of(response, 202))["jobId"]
        assert (await follow(client, job_id))[-1].data["status"] == "completed"


async def test_a_project_created_while_running_is_listed(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    client = await start(make_config({}))
    assert [p["projectId"] for p in await get_data(client, "/api/projects")] == ["proj"]
    write_project(tmp_path / "projects", "later")
    assert sorted(p["projectId"] for p in await get_data(client, "/api/projects")) == ["later", "proj"]


async def test_healthz(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({}))
    assert await data_of(await client.get("/healthz")) == {"status": "ok"}


async def test_openapi_document_is_json_describing_the_routes(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({}))
    response = await client.get("/api/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    document = await response.json()
    assert str(document["openapi"]).startswith("3.")
    for path in ("/api/execute", "/api/jobs", "/api/jobs/{jobId}", "/api/jobs/{jobId}/log", "/api/stream/{jobId}"):
        assert path in document["paths"], path


# --- auth -------------------------------------------------------------------------------


async def test_with_a_token_every_api_route_needs_it(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}, server={"auth_token": TOKEN}))
    good = {"Authorization": f"Bearer {TOKEN}"}
    response = await client.post("/api/execute", json={"toolId": "hello", "projectId": "proj"}, headers=good)
    job_id = (await data_of(response, status=202))["jobId"]
    routes = [
        ("GET", "/api/jobs"),
        ("GET", f"/api/jobs/{job_id}"),
        ("GET", f"/api/jobs/{job_id}/log"),
        ("DELETE", f"/api/jobs/{UNKNOWN_JOB}"),
        ("GET", f"/api/stream/{job_id}"),
        ("GET", "/api/queue/status"),
        ("GET", "/api/tools"),
        ("GET", "/api/projects"),
        ("GET", "/api/openapi.json"),
        ("POST", "/api/execute"),
        ("GET", "/api/nope"),  # no route discovery without the token either
    ]
    wrong_headers: list[dict[str, str]] = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},  # the token without the Bearer scheme
    ]
    body = {"toolId": "hello", "projectId": "proj"}
    for method, path in routes:
        for headers in wrong_headers:
            response = await client.request(method, path, headers=headers, json=body)
            await error_of(response, 401, "unauthorized")
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="streamsvc"'
    assert len(await get_data(client, "/api/jobs", **good)) == 1  # the refused POSTs created nothing
    assert lines_of(await follow(client, job_id, **good)) == ["hello", "world"]
    assert await (await client.get(f"/api/jobs/{job_id}/log", headers=good)).text() == "hello\nworld\n"


async def test_with_a_token_the_stream_accepts_it_in_the_query(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}, server={"auth_token": TOKEN}))
    response = await client.post(
        "/api/execute", json={"toolId": "hello", "projectId": "proj"}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    job_id = (await data_of(response, status=202))["jobId"]

    async with client.get(f"/api/stream/{job_id}", params={"token": TOKEN}) as stream:
        assert lines_of(await collect(stream)) == ["hello", "world"]
    await error_of(await client.get(f"/api/stream/{job_id}", params={"token": "wrong"}), 401, "unauthorized")
    await error_of(await client.get(f"/api/stream/{job_id}", params={"token": ""}), 401, "unauthorized")
    # only the stream takes the query form (EventSource cannot send headers; the rest can)
    await error_of(await client.get("/api/jobs", params={"token": TOKEN}), 401, "unauthorized")
    await error_of(await client.get(f"/api/jobs/{job_id}", params={"token": TOKEN}), 401, "unauthorized")


async def test_with_a_token_healthz_stays_open(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({}, server={"auth_token": TOKEN}))
    assert await data_of(await client.get("/healthz")) == {"status": "ok"}
    assert await data_of(await client.get("/healthz", headers={"Authorization": "Bearer wrong"})) == {"status": "ok"}


async def test_without_a_token_no_auth_is_asked(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    job_id = await submit(client, "hello")
    assert lines_of(await follow(client, job_id, Authorization="Bearer anything")) == ["hello", "world"]
    await data_of(await client.get("/api/jobs"))


async def test_a_non_utf8_authorization_header_is_401(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({}, server={"auth_token": TOKEN}))
    url = client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        request = b"GET /api/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
        writer.write(request)
        await writer.drain()
        head = (await reader.read()).split(b"\r\n", 1)[0]
    finally:
        writer.close()
        await writer.wait_closed()
    assert head == b"HTTP/1.1 401 Unauthorized"
