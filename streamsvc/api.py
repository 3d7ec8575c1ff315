"""HTTP handlers and the two middlewares (error envelope, bearer auth)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import HttpVersion11, web

from .clients import client_address
from .config import Config
from .errors import (
    BadRequest,
    PastLastEvent,
    StreamsvcError,
    Unauthorized,
    UnknownJob,
    UnsupportedMediaType,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .models import JobStatus
from .pool import WorkerPool
from .projects import Projects, UploadedProjects
from .registry import Session, SessionRegistry, SessionResponse
from .store import JobStore
from .uploads import received, spool

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
POOL = web.AppKey("pool", WorkerPool)
STORE = web.AppKey("store", JobStore)
PROJECTS = web.AppKey("projects", Projects)
UPLOADS = web.AppKey("uploads", UploadedProjects)
REGISTRY = web.AppKey("registry", SessionRegistry)
METRICS = web.AppKey("metrics", Metrics)

MAX_ID_CHARS = 200
MAX_LIST_LIMIT = 1000
#: how much of a log one write of GET /api/jobs/{id}/log parses and sends
LOG_CHUNK_BYTES = 256 * 1024
#: the largest JSON body any route takes
MAX_JSON_BYTES = 64 * 1024
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
routes = web.RouteTableDef()


def ok(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"data": data}, status=status, headers=headers)


@web.middleware
async def error_envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes the JSON envelope; nothing reaches a client as a traceback."""
    try:
        return await handler(request)
    except StreamsvcError as exc:
        return web.json_response(exc.envelope(), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, "http_error")
        body = {"error": {"type": "user_error", "code": code, "message": exc.reason}}
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return web.json_response(body, status=exc.status, headers=headers)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        body = {"error": {"type": "system_error", "code": "internal", "message": "internal error"}}
        return web.json_response(body, status=500)


@web.middleware
async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With `auth_token` set, every /api/ route needs it (the stream route also as ?token=)."""
    token = request.app[CONFIG].server.auth_token
    if token and request.path.startswith("/api/"):
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        offered = [credentials.strip(" ")] if scheme.lower() == "bearer" else []
        if request.path.startswith("/api/stream/") and "token" in request.query:
            offered.append(request.query["token"])
        expected = token.encode()
        if not any(hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected) for given in offered):
            raise Unauthorized("missing or wrong bearer token")
    return await handler(request)


async def read_json(request: web.Request, fields: tuple[str, ...]) -> dict[str, str]:
    """A JSON object with exactly `fields`, each a short string without NUL."""
    if request.content_type != "application/json":
        raise UnsupportedMediaType("the body must be JSON (Content-Type: application/json)")
    if request.content_length is not None and request.content_length > request.client_max_size:
        # told now, not once that much has come (a client may be waiting to send it)
        raise web.HTTPRequestEntityTooLarge(max_size=request.client_max_size, actual_size=request.content_length)
    try:
        body = json.loads(await received(request.read(), request.app[CONFIG].server.stream_stall_s))
    except web.RequestPayloadError:
        raise BadRequest("the body could not be read (bad Content-Encoding?)") from None
    except (ValueError, RecursionError):
        raise BadRequest("the body is not valid JSON (or nested too deeply)") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise BadRequest(f"unknown field: {unknown[0][:MAX_ID_CHARS]!r}")
    for name in fields:
        value = body.get(name)
        if not isinstance(value, str) or not value:
            raise BadRequest(f"{name} must be a non-empty string")
        if len(value) > MAX_ID_CHARS or "\0" in value:
            raise BadRequest(f"{name} must be at most {MAX_ID_CHARS} characters, without NUL")
    return body


def job_id_of(request: web.Request) -> str:
    job_id = request.match_info["jobId"]
    if job_id not in request.app[STORE].jobs:
        raise UnknownJob(job_id[:MAX_ID_CHARS])
    return job_id


@routes.post("/api/execute")
async def execute(request: web.Request) -> web.Response:
    body = await read_json(request, ("toolId", "projectId"))
    client = client_address(request, request.app[CONFIG].clients.trust_forwarded_for)
    job = request.app[POOL].submit(body["toolId"], body["projectId"], client)
    job_url = f"/api/jobs/{job.job_id}"
    data = {
        "jobId": job.job_id,
        "status": job.status.value,
        "streamUrl": f"/api/stream/{job.job_id}",
        "jobUrl": job_url,
    }
    return ok(data, status=202, headers={"Location": job_url})


@routes.get("/api/jobs")
async def list_jobs(request: web.Request) -> web.Response:
    status = _query_status(_query(request, "status"))
    limit = _query_int(_query(request, "limit"), "limit", default=100, high=MAX_LIST_LIMIT)
    pool = request.app[POOL]
    positions = pool.positions()
    jobs: list[dict[str, Any]] = []
    for job in request.app[STORE].newest(status):
        if len(jobs) == limit:
            break
        jobs.append(pool.job_json(job, positions))
    return ok(jobs)


@routes.get("/api/jobs/{jobId:[^/]+}")
async def get_job(request: web.Request) -> web.Response:
    job = request.app[STORE].get(job_id_of(request))
    return ok(request.app[POOL].job_json(job))


@routes.delete("/api/jobs/{jobId:[^/]+}")
async def cancel_job(request: web.Request) -> web.Response:
    pool = request.app[POOL]
    job = pool.cancel(job_id_of(request))
    return ok(pool.job_json(job), status=202)


@routes.get("/api/jobs/{jobId:[^/]+}/log")
async def job_log(request: web.Request) -> web.StreamResponse:
    job_id = job_id_of(request)
    joblog = await request.app[STORE].open_log(job_id)
    stall_s = request.app[CONFIG].server.stream_stall_s
    response = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await _prepare_unsized(response, request)
    try:
        for batch in joblog.event_batches(LOG_CHUNK_BYTES):  # what it holds now: a running job is not waited for
            lines = [data["line"] + "\n" for _, kind, data in batch if kind == "output"]
            async with asyncio.timeout(stall_s):  # a reader that takes nothing is cut off, as a stream's is
                await response.write("".join(lines).encode())
            await asyncio.sleep(0)  # a long log must not hold the loop
    except OSError as exc:  # that, or the log went (retention) while it was read: a cut body must not look whole
        if isinstance(exc, TimeoutError):
            log.info("the log of job %s cut off: its reader took nothing for %g s", job_id, stall_s)
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


#: the `retry:` of a stream with nothing to send, ever (a finished job resumed after its last
#: event): an EventSource that reconnects to it anyway waits a day, not `retry_ms`, each time
NOTHING_FOLLOWS_RETRY_MS = 24 * 3600 * 1000


@routes.get("/api/stream/{jobId:[^/]+}")
async def stream(request: web.Request) -> web.StreamResponse:
    job_id = job_id_of(request)
    config = request.app[CONFIG]
    store = request.app[STORE]
    cursor = _last_event_id(request)
    tool = config.tools.get(store.get(job_id).tool_id)
    heartbeat_s = (tool.limits if tool else config.limits).heartbeat_s
    if request.body_exists:  # (aiohttp would wait for it after the session took the connection)
        raise BadRequest("a stream request has no body")
    joblog = await store.open_log(job_id)
    if joblog.finished and cursor > joblog.last_seq:
        raise PastLastEvent(cursor, joblog.last_seq)  # the client's id is not from this job's log
    nothing_follows = joblog.finished and cursor == joblog.last_seq
    retry_ms = NOTHING_FOLLOWS_RETRY_MS if nothing_follows else config.server.retry_ms
    response = SessionResponse(send_timeout=config.server.stream_stall_s)
    await response.prepare(request)
    session = Session(job_id, joblog, cursor, heartbeat_s, request.app[REGISTRY])
    await response.write(session.opening(f"retry: {retry_ms}\n\n".encode()))  # the head goes out with it
    session.attach(request, response)
    return response


@routes.get("/api/queue/status")
async def queue_status(request: web.Request) -> web.Response:
    return ok(request.app[POOL].status())


@routes.get("/api/tools")
async def tools(request: web.Request) -> web.Response:
    tools = request.app[CONFIG].tools.values()
    return ok(
        [{"id": t.id, "description": t.description, "timeoutMs": round(t.limits.timeout_s * 1000)} for t in tools]
    )


@routes.get("/api/projects")
async def projects(request: web.Request) -> web.Response:
    return ok(request.app[PROJECTS].listing())


@routes.post("/api/projects")
async def upload_project(request: web.Request) -> web.Response:
    """A zip, streamed to disk (never whole in memory, so `client_max_size` does not apply), then unpacked."""
    max_bytes = request.app[CONFIG].uploads.max_total_bytes
    stall_s = request.app[CONFIG].server.stream_stall_s
    upload = await request.app[UPLOADS].receive(lambda path: spool(request, path, max_bytes, stall_s))
    return ok(upload.summary(), status=201)


@routes.delete("/api/projects/{projectId:[^/]+}")
async def delete_project(request: web.Request) -> web.Response:
    return ok(await request.app[PROJECTS].delete(request.match_info["projectId"]))


@routes.get("/api/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    text = resources.files("streamsvc").joinpath("openapi.json").read_text(encoding="utf-8")
    return web.Response(text=text, content_type="application/json")


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return ok({"status": "ok"})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format; open like /healthz (scrapers sit beside the service)."""
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _prepare_unsized(response: web.StreamResponse, request: web.Request) -> None:
    """Send the head of a response whose length is not known (chunked in HTTP/1.1). An
    HTTP/1.0 body ends only when its connection does, so it is closed after it even if
    the client asked to keep it alive."""
    if request.version < HttpVersion11:
        response.force_close()
        response.headers["Connection"] = "close"  # (aiohttp-sse's head says keep-alive)
    await response.prepare(request)


def _last_event_id(request: web.Request) -> int:
    raw = request.headers.get("Last-Event-ID", "") or _query(request, "lastEventId") or ""
    return _query_int(raw or None, "Last-Event-ID", default=0, high=10**15, low=0)


def _query(request: web.Request, name: str) -> str | None:
    """A query parameter given at most once."""
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise BadRequest(f"{name} must be given at most once")
    return values[0] if values else None


def _query_int(raw: str | None, name: str, *, default: int, high: int, low: int = 1) -> int:
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 16 or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be an integer from {low} to {high}, got {raw[:40]!r}")
    return int(raw)


def _query_status(raw: str | None) -> JobStatus | None:
    if raw is None:
        return None
    try:
        return JobStatus(raw)
    except ValueError:
        names = ", ".join(status.value for status in JobStatus)
        raise BadRequest(f"status must be one of {names}") from None
