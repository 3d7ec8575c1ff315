"""The OpenAPI document: served as packaged, in step with the routes, and true to what the service answers."""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import ClientResponse
from conftest import (
    PY,
    UNKNOWN_JOB,
    Client,
    ClientFactory,
    ConfigFactory,
    Event,
    collect,
    follow,
    submit,
    wait_job,
)
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from streamsvc import errors
from streamsvc.api import _HTTP_CODES, POOL
from streamsvc.models import Job, JobStatus

#: the base URI the document is registered under, so "#/components/..." refs resolve inside it
DOC_URI = "urn:streamsvc:openapi"
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
#: which component schema each SSE event's data follows
EVENT_SCHEMAS = {
    "status": "StatusEvent",
    "output": "OutputEvent",
    "complete": "ExecutionResponse",
    "error": "ErrorEvent",
}


def packaged_text() -> str:
    return resources.files("streamsvc").joinpath("openapi.json").read_text(encoding="utf-8")


DOC: dict[str, Any] = json.loads(packaged_text())
REGISTRY: Registry[Any] = Registry().with_resource(DOC_URI, DRAFT202012.create_resource(DOC))


def pointer(parts: tuple[str, ...]) -> str:
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


def validator_at(*parts: str) -> Draft202012Validator:
    """A validator for the schema at `parts` inside the document (a JSON pointer's steps)."""
    schema = {"$ref": f"{DOC_URI}#{pointer(parts)}"}
    return Draft202012Validator(schema, registry=REGISTRY, format_checker=Draft202012Validator.FORMAT_CHECKER)


def check_schema(name: str, instance: Any) -> None:
    validator_at("components", "schemas", name).validate(instance)


def documented(path: str, method: str, status: int) -> tuple[tuple[str, ...], dict[str, Any]]:
    """Where the documented response of an operation for `status` lives, and what it says."""
    responses = DOC["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered {status}, which is not documented"
    location: tuple[str, ...] = ("paths", path, method, "responses", str(status))
    spec: dict[str, Any] = responses[str(status)]
    if "$ref" in spec:
        location = tuple(spec["$ref"].removeprefix("#/").split("/"))
        spec = DOC[location[0]][location[1]][location[2]]
    return location, spec


def check_head(response: ClientResponse, path: str, method: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The status, the content type and the headers are as documented."""
    location, spec = documented(path, method, response.status)
    assert response.content_type in spec["content"], (response.content_type, list(spec["content"]))
    for name, header in spec.get("headers", {}).items():
        if name not in response.headers:
            assert not header.get("required", False), f"missing header {name}"
            continue
        value: Any = response.headers[name]
        if header["schema"].get("type") == "integer":
            value = int(value)
        validator_at(*location, "headers", name, "schema").validate(value)
    return location, spec


async def check_response(response: ClientResponse, path: str, method: str) -> Any:
    """Validate a whole response against the document; return its parsed body."""
    location, _ = check_head(response, path, method)
    if response.content_type != "application/json":
        return await response.text()
    body = await response.json()
    validator_at(*location, "content", "application/json", "schema").validate(body)
    return body


async def call(client: Client, method: str, path: str, template: str, **kwargs: Any) -> Any:
    """Request `path` (an instance of the documented `template`), check the answer, return its body."""
    async with client.request(method, path, **kwargs) as response:
        return await check_response(response, template, method.lower())


async def get_job(client: Client, job_id: str) -> dict[str, Any]:
    """The job's record, the whole response checked against the document."""
    body = await call(client, "GET", f"/api/jobs/{job_id}", "/api/jobs/{jobId}")
    job: dict[str, Any] = body["data"]
    return job


async def stream(client: Client, job_id: str) -> list[Event]:
    """The job's whole event stream, each event's data checked against its schema."""
    async with client.get(f"/api/stream/{job_id}") as response:
        check_head(response, "/api/stream/{jobId}", "get")
        events = await collect(response)
    for event in events:
        check_schema(EVENT_SCHEMAS[event.event], event.data)
    return events


def walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under `key` anywhere in `node`."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key:
                yield value
            yield from walk(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def is_page_asset(path: str) -> bool:
    """The web page's own files and its deep links: for browsers, not part of the API."""
    return path.startswith(("/static/", "/jobs/"))


def operations() -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in DOC["paths"].items() for method in item if method in HTTP_METHODS}


# --- the document itself --------------------------------------------------------------------------------------------


async def test_served_document_is_the_packaged_file(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({}))
    async with client.get("/api/openapi.json") as response:
        assert await response.text() == packaged_text()
        body = await check_response(response, "/api/openapi.json", "get")
    assert body == DOC
    assert DOC["openapi"] == "3.1.0"
    assert {"title", "version"} <= set(DOC["info"])


def test_document_is_well_formed() -> None:
    for schema in [*DOC["components"]["schemas"].values(), *walk(DOC["paths"], "schema")]:
        Draft202012Validator.check_schema(schema)
    resolver = REGISTRY.resolver(base_uri=DOC_URI)
    for ref in walk(DOC, "$ref"):
        assert ref.startswith("#/components/"), ref
        resolver.lookup(ref)  # raises when the target is missing
    ids = [op["operationId"] for item in DOC["paths"].values() for name, op in item.items() if name in HTTP_METHODS]
    assert len(ids) == len(set(ids)) == len(operations())
    for path, item in DOC["paths"].items():
        names = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        assert names == set(re.findall(r"\{(\w+)\}", path)), path
        for method in HTTP_METHODS & set(item):
            for status in item[method]["responses"]:
                spec = documented(path, method, int(status))[1]
                assert spec["content"], (path, method, status)
                if int(status) >= 400:
                    assert spec["content"] == {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    bearer = DOC["components"]["securitySchemes"]["bearerAuth"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert {} in DOC["security"], "auth is optional: it applies only when auth_token is configured"
    assert DOC["paths"]["/healthz"]["get"]["security"] == []


async def test_every_route_is_documented_and_every_documented_route_exists(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    client = await start(make_config({}))
    assert client.app is not None
    served = {
        (route.resource.canonical, route.method)
        for route in client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None and not is_page_asset(route.resource.canonical)
    }
    assert served == operations()


def test_error_codes_are_all_named() -> None:
    def subclasses(cls: type[errors.StreamsvcError]) -> Iterator[type[errors.StreamsvcError]]:
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    codes = {cls.code for cls in subclasses(errors.StreamsvcError)} | set(_HTTP_CODES.values())
    codes |= {errors.StreamsvcError.code, "http_error"}
    error = DOC["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
    named = set(re.findall(r"`(\w+)`", error["code"]["description"]))
    assert codes <= named
    assert all(re.fullmatch(error["code"]["pattern"], code) for code in codes)
    for cls in subclasses(errors.StreamsvcError):
        assert cls.type in error["type"]["enum"]


# --- the models, in every state -------------------------------------------------------------------------------------


def test_job_schemas_name_exactly_the_fields_the_models_produce() -> None:
    assert DOC["components"]["schemas"]["JobStatus"]["enum"] == [status.value for status in JobStatus]
    job = Job(job_id=UNKNOWN_JOB, tool_id="t", project_id="p")
    for name, body in (("Job", job.to_json()), ("ExecutionResponse", job.execution_response([]))):
        schema = DOC["components"]["schemas"][name]
        assert set(schema["properties"]) == set(schema["required"]) == set(body), name


def job_states() -> Iterator[Any]:
    """`pytest.param(job, queue position, wait estimate)` for a job in each state."""
    queued = Job(job_id=UNKNOWN_JOB, tool_id="t", project_id="p")
    yield pytest.param(queued, 3, 1500, id="queued")
    running = Job(job_id=UNKNOWN_JOB, tool_id="t", project_id="p", output_lines=2)
    running.transition(JobStatus.RUNNING)
    yield pytest.param(running, None, None, id="running")
    for status, exit_code, signal, error in (
        (JobStatus.COMPLETED, 0, None, None),
        (JobStatus.FAILED, 3, None, "exited with status 3"),
        (JobStatus.TIMEOUT, None, "SIGKILL", "timed out after 1 s"),
        (JobStatus.LOST, None, None, "the service stopped while the job ran"),
    ):
        job = Job(job_id=UNKNOWN_JOB, tool_id="t", project_id="p", output_bytes=10, truncated=True)
        job.transition(JobStatus.RUNNING)
        job.exit_code, job.signal = exit_code, signal
        job.transition(status, error=error)
        yield pytest.param(job, None, None, id=status.value)
    cancelled = Job(job_id=UNKNOWN_JOB, tool_id="t", project_id="p")
    cancelled.transition(JobStatus.CANCELLED, error="cancelled before it started")
    yield pytest.param(cancelled, None, None, id="cancelled-before-start")


@pytest.mark.parametrize(("job", "position", "wait_ms"), list(job_states()))
def test_job_records_in_every_state_match(job: Job, position: int | None, wait_ms: int | None) -> None:
    check_schema("Job", job.to_json(position, wait_ms))
    if job.status.finished:
        check_schema("ExecutionResponse", job.execution_response(["a", "b"]))


# --- real responses -------------------------------------------------------------------------------------------------


async def test_execute_and_a_completed_job_match(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    async with client.post("/api/execute", json={"toolId": "hello", "projectId": "proj"}) as response:
        accepted = (await check_response(response, "/api/execute", "post"))["data"]
        assert response.status == 202
        assert response.headers["Location"] == accepted["jobUrl"] == f"/api/jobs/{accepted['jobId']}"
    job_id = accepted["jobId"]

    events = await stream(client, job_id)
    assert [e.event for e in events] == ["status", "output", "output", "status", "complete"]
    assert events[-1].data["status"] == "completed"
    assert events[-1].data["output"] == ["hello", "world"]
    assert await follow(client, job_id) == events

    job = await get_job(client, job_id)
    assert job["status"] == "completed" and job["exitCode"] == 0 and job["error"] is None
    assert job["queuePosition"] is None and job["outputLines"] == 2 and job["outputBytes"] > 0
    text = await call(client, "GET", f"/api/jobs/{job_id}/log", "/api/jobs/{jobId}/log")
    assert text == "hello\nworld\n"
    listed = await call(client, "GET", "/api/jobs?status=completed&limit=1", "/api/jobs")
    assert listed["data"] == [job]


async def test_failed_and_timed_out_jobs_match(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    never = tmp_path / "never"
    tools = {
        "fail": [PY, "both.py", "3"],
        "slow": {"argv": [PY, "gate.py", str(never)], "timeout_s": 0.3, "kill_grace_s": 0.1},
    }
    client = await start(make_config(tools, queue={"workers": 2}))
    failed_id, slow_id = await submit(client, "fail"), await submit(client, "slow")

    failed = await stream(client, failed_id)
    assert failed[-1].data["status"] == "failed" and failed[-1].data["exitCode"] == 3
    job = await get_job(client, failed_id)
    assert job["status"] == "failed" and job["exitCode"] == 3 and isinstance(job["error"], str)

    slow = await stream(client, slow_id)
    assert slow[-1].data["status"] == "timeout"
    job = await get_job(client, slow_id)
    assert job["status"] == "timeout" and isinstance(job["signal"], str) and job["exitCode"] is None

    listed = await call(client, "GET", "/api/jobs", "/api/jobs")
    assert [j["jobId"] for j in listed["data"]] == [slow_id, failed_id]


async def test_queued_running_and_cancelled_jobs_match(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    tools = {"gate": [PY, "gate.py", str(gate)], "hello": [PY, "hello.py"]}
    client = await start(make_config(tools, queue={"workers": 1}))
    running_id = await submit(client, "gate")
    running = await wait_job(client, running_id, "running", fetch=get_job)
    assert running["startedAt"] is not None and running["completedAt"] is None and running["exitCode"] is None

    queued_id = await submit(client, "hello")
    queued = await get_job(client, queued_id)
    assert queued["status"] == "queued" and queued["queuePosition"] == 1 and queued["estimatedWaitMs"] is not None

    status = await call(client, "GET", "/api/queue/status", "/api/queue/status")
    assert (status["data"]["running"], status["data"]["pending"], status["data"]["position"]) == (1, 1, 2)
    listed = await call(client, "GET", "/api/jobs?status=queued", "/api/jobs")
    assert listed["data"] == [queued]
    everything = await call(client, "GET", "/api/jobs?limit=1000", "/api/jobs")
    assert [j["jobId"] for j in everything["data"]] == [queued_id, running_id]

    cancelled = (await call(client, "DELETE", f"/api/jobs/{queued_id}", "/api/jobs/{jobId}"))["data"]
    assert cancelled["status"] == "cancelled" and cancelled["startedAt"] is None and cancelled["queuePosition"] is None
    events = await stream(client, queued_id)
    assert [e.event for e in events] == ["status", "complete"]
    again = await call(client, "DELETE", f"/api/jobs/{queued_id}", "/api/jobs/{jobId}")
    assert again["error"]["code"] == "job_finished"

    stopping = (await call(client, "DELETE", f"/api/jobs/{running_id}", "/api/jobs/{jobId}"))["data"]
    assert stopping["status"] in {"running", "cancelled"}
    events = await stream(client, running_id)
    assert events[-1].data["status"] == "cancelled"
    assert (await get_job(client, running_id))["status"] == "cancelled"


async def test_listings_and_health_match(make_config: ConfigFactory, start: ClientFactory) -> None:
    tools = {"hello": {"argv": [PY, "hello.py"], "description": "Say hello", "timeout_s": 1.5}, "bare": [PY, "-V"]}
    client = await start(make_config(tools))
    listed = await call(client, "GET", "/api/tools", "/api/tools")
    assert {t["id"]: t for t in listed["data"]} == {
        "hello": {"id": "hello", "description": "Say hello", "timeoutMs": 1500},
        "bare": {"id": "bare", "description": "", "timeoutMs": 60000},
    }
    projects = await call(client, "GET", "/api/projects", "/api/projects")
    assert projects["data"] == [{"projectId": "proj", "uploaded": False}]
    assert await call(client, "GET", "/healthz", "/healthz") == {"data": {"status": "ok"}}
    assert (await call(client, "GET", "/api/jobs", "/api/jobs"))["data"] == []
    status = (await call(client, "GET", "/api/queue/status", "/api/queue/status"))["data"]
    assert status == status | {"concurrency": 4, "running": 0, "pending": 0, "position": 1, "estimatedWaitMs": 0}


async def test_error_bodies_match(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}))
    job_id = await submit(client, "hello")
    await follow(client, job_id)

    bad_bodies: list[Any] = [
        {"toolId": "hello", "projectId": "proj", "extra": 1},
        {"toolId": "hello"},
        {"toolId": "", "projectId": "proj"},
        {"toolId": 1, "projectId": "proj"},
        {"toolId": "hello", "projectId": "x" * 201},
        {"toolId": "hello", "projectId": "a\0b"},
        ["hello", "proj"],
    ]
    for bad in bad_bodies:
        body = await call(client, "POST", "/api/execute", "/api/execute", json=bad)
        assert body["error"]["code"] == "bad_request", bad
    headers = {"Content-Type": "application/json"}
    for raw in (b"", b"{", b"\xff\xfe\x00", b'"text"'):
        body = await call(client, "POST", "/api/execute", "/api/execute", data=raw, headers=headers)
        assert body["error"]["code"] == "bad_request", raw
    for query in ("status=nope", "limit=0", "limit=1001", "limit=x", "limit=-1"):
        body = await call(client, "GET", f"/api/jobs?{query}", "/api/jobs")
        assert body["error"]["code"] == "bad_request", query
    for value in ("abc", "-1", "1.5", "9" * 17):
        body = await call(
            client, "GET", f"/api/stream/{job_id}", "/api/stream/{jobId}", headers={"Last-Event-ID": value}
        )
        assert body["error"]["code"] == "bad_request", value
    body = await call(client, "GET", f"/api/stream/{job_id}?lastEventId=x", "/api/stream/{jobId}")
    assert body["error"]["code"] == "bad_request"

    for tool, project, code in (("nope", "proj", "unknown_tool"), ("hello", "nope", "unknown_project")):
        body = await call(client, "POST", "/api/execute", "/api/execute", json={"toolId": tool, "projectId": project})
        assert body["error"]["code"] == code
    for method, template in (
        ("GET", "/api/jobs/{jobId}"),
        ("DELETE", "/api/jobs/{jobId}"),
        ("GET", "/api/jobs/{jobId}/log"),
        ("GET", "/api/stream/{jobId}"),
    ):
        body = await call(client, method, template.replace("{jobId}", UNKNOWN_JOB), template)
        assert body["error"] == {
            "type": "user_error",
            "code": "unknown_job",
            "message": f"unknown job: {UNKNOWN_JOB!r}",
        }

    for data, content_type in ((b'{"toolId": "hello", "projectId": "proj"}', "text/plain"), (b"x", "")):
        body = await call(
            client, "POST", "/api/execute", "/api/execute", data=data, headers={"Content-Type": content_type}
        )
        assert body["error"]["code"] == "unsupported_media_type"
    body = await call(client, "POST", "/api/execute", "/api/execute", data=b" " * 70_000, headers=headers)
    assert body["error"]["code"] == "body_too_large"

    # routes and methods the document does not name still answer with the envelope
    for method, path, status in (("GET", "/api/nowhere", 404), ("PUT", "/api/jobs", 405)):
        async with client.request(method, path) as response:
            assert response.status == status
            check_schema("Error", await response.json())


async def test_auth_errors_match(make_config: ConfigFactory, start: ClientFactory) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}, server={"auth_token": "s3cret"}))
    for method, path, template in (
        ("POST", "/api/execute", "/api/execute"),
        ("GET", "/api/jobs", "/api/jobs"),
        ("GET", f"/api/jobs/{UNKNOWN_JOB}", "/api/jobs/{jobId}"),
        ("DELETE", f"/api/jobs/{UNKNOWN_JOB}", "/api/jobs/{jobId}"),
        ("GET", f"/api/jobs/{UNKNOWN_JOB}/log", "/api/jobs/{jobId}/log"),
        ("GET", f"/api/stream/{UNKNOWN_JOB}", "/api/stream/{jobId}"),
        ("GET", "/api/queue/status", "/api/queue/status"),
        ("GET", "/api/tools", "/api/tools"),
        ("GET", "/api/projects", "/api/projects"),
        ("GET", "/api/openapi.json", "/api/openapi.json"),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            body = await call(client, method, path, template, headers=headers)
            assert body["error"]["code"] == "unauthorized", (method, path, headers)
    assert await call(client, "GET", "/healthz", "/healthz") == {"data": {"status": "ok"}}
    authorized = {"Authorization": "Bearer s3cret"}
    assert (await call(client, "GET", "/api/tools", "/api/tools", headers=authorized))["data"][0]["id"] == "hello"
    body = await call(client, "GET", f"/api/stream/{UNKNOWN_JOB}?token=s3cret", "/api/stream/{jobId}")
    assert body["error"]["code"] == "unknown_job"  # past auth


async def test_queue_full_and_shutting_down_match(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    config = make_config({"gate": [PY, "gate.py", str(gate)]}, queue={"workers": 1, "max_pending": 1})
    client = await start(config)
    await wait_job(client, await submit(client, "gate"), "running", fetch=get_job)
    await submit(client, "gate")
    request = {"toolId": "gate", "projectId": "proj"}
    body = await call(client, "POST", "/api/execute", "/api/execute", json=request)
    assert body["error"]["code"] == "queue_full"

    assert client.app is not None
    client.app[POOL].close()
    async with client.post("/api/execute", json=request) as response:
        body = await check_response(response, "/api/execute", "post")
        assert response.status == 503 and "Retry-After" in response.headers
    assert body["error"] == body["error"] | {"type": "system_error", "code": "shutting_down"}
    gate.touch()


def zip_of(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


async def test_project_uploads_and_deletions_match(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    (tmp_path / "gate.py").write_text(
        "import os, sys, time\nwhile not os.path.exists(sys.argv[1]):\n    time.sleep(0.01)\n"
    )
    config = make_config({"gate": [PY, str(tmp_path / "gate.py"), str(gate)]}, uploads={"max_entries": 2})
    client = await start(config)
    zip_headers = {"Content-Type": "application/zip"}
    body = await call(
        client,
        "POST",
        "/api/projects",
        "/api/projects",
        data=zip_of({"a.txt": "a", "b/c.txt": "c"}),
        headers=zip_headers,
    )
    created = body["data"]
    assert created == {"projectId": created["projectId"], "fileCount": 2, "bytes": 2}
    form = aiohttp.FormData()
    form.add_field("file", zip_of({"x.txt": "x"}), filename="p.zip", content_type="application/zip")
    assert (await call(client, "POST", "/api/projects", "/api/projects", data=form))["data"]["fileCount"] == 1
    listed = (await call(client, "GET", "/api/projects", "/api/projects"))["data"]
    assert [(p["projectId"], p["uploaded"]) for p in listed][:2] == [("proj", False), (created["projectId"], True)]

    for data, headers, code in (
        (b"not a zip", zip_headers, "bad_archive"),
        (zip_of({"../evil": "x"}), zip_headers, "unsafe_path"),
        (zip_of({"1": "", "2": "", "3": ""}), zip_headers, "too_many_entries"),
        (b"PK", {"Content-Type": "text/plain"}, "unsupported_media_type"),
    ):
        body = await call(client, "POST", "/api/projects", "/api/projects", data=data, headers=headers)
        assert body["error"]["code"] == code

    template = "/api/projects/{projectId}"
    job_id = await submit(client, "gate", created["projectId"])
    await wait_job(client, job_id, "running", fetch=get_job)
    busy = [p for p in (await call(client, "GET", "/api/projects", "/api/projects"))["data"] if p.get("busy")]
    assert [(p["projectId"], p["expiresAt"]) for p in busy] == [(created["projectId"], None)]
    body = await call(client, "DELETE", f"/api/projects/{created['projectId']}", template)
    assert body["error"]["code"] == "project_busy"
    gate.touch()
    await wait_job(client, job_id, "completed", fetch=get_job)
    assert (await call(client, "DELETE", f"/api/projects/{created['projectId']}", template))["data"] == created
    for project_id, code in (("proj", "project_configured"), (created["projectId"], "unknown_project")):
        body = await call(client, "DELETE", f"/api/projects/{project_id}", template)
        assert body["error"]["code"] == code
