"""The application factory: wires the pieces together, nothing more."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from aiohttp import web

from .api import (
    CONFIG,
    MAX_JSON_BYTES,
    METRICS,
    POOL,
    PROJECTS,
    REGISTRY,
    STORE,
    UPLOADS,
    bearer_auth,
    error_envelope,
    routes,
)
from .config import Config
from .logs import ACCESS_LOG, AccessLogger
from .metrics import Metrics
from .pool import WorkerPool
from .projects import Projects, UploadedProjects
from .registry import SessionRegistry
from .store import JobStore, data_folder_held
from .webui import routes as page_routes

CleanupContext = Callable[[web.Application], AsyncIterator[None]]


def server_options() -> dict[str, Any]:
    """The access log of the HTTP server around the app (`web.run_app`, test servers):
    one line per request, secrets hidden (a stream's is written by its session when the
    stream ends, with all its bytes and its whole time)."""
    return {"access_log_class": AccessLogger, "access_log": ACCESS_LOG}


def create_app(config: Config) -> web.Application:
    app = web.Application(
        middlewares=[error_envelope, bearer_auth],
        client_max_size=MAX_JSON_BYTES,
        # long enough that an absurd id still reaches the handlers and gets the envelope
        handler_args={"max_line_size": 65536, "max_field_size": 65536},
    )
    result_lines = {tool_id: tool.limits.max_result_lines for tool_id, tool in config.tools.items()}
    store = JobStore(config.server.data_dir, config.server.retention_jobs, config.limits.max_result_lines, result_lines)
    uploaded = UploadedProjects(config.server.data_dir, config.uploads, store)
    projects = Projects(config.projects.root, uploaded)
    app[CONFIG] = config
    app[STORE] = store
    app[PROJECTS] = projects
    app[UPLOADS] = uploaded
    metrics = Metrics()
    app[METRICS] = metrics
    app[POOL] = WorkerPool(config, store, projects, metrics)
    app[REGISTRY] = SessionRegistry(config.server.stream_stall_s, _timer_tick_s(config))
    metrics.watch(app[POOL], app[REGISTRY])
    app.add_routes(routes)
    app.add_routes(page_routes)
    app.cleanup_ctx.append(_data_folder_lifetime)  # before anything reads or changes it
    app.cleanup_ctx.append(_uploads_lifetime)  # before the pool: a recovered job may run on an upload
    app.cleanup_ctx.append(_pool_lifetime)
    # after the pool: recovered jobs keep their projects
    app.cleanup_ctx.append(_background("upload-sweeper", uploaded.sweep_forever))
    app.cleanup_ctx.append(_background("stream-timer", app[REGISTRY].run_timer))
    app.on_shutdown.append(_close_streams)
    return app


def _timer_tick_s(config: Config) -> float:
    """How often the streams' timer looks at every session: often enough for the shortest
    heartbeat and to cut a stalled peer off soon after `stream_stall_s`; at least once a second."""
    heartbeats = [config.limits.heartbeat_s, *(tool.limits.heartbeat_s for tool in config.tools.values())]
    return min(1.0, config.server.stream_stall_s / 4, min(heartbeats) / 2)


async def _pool_lifetime(app: web.Application) -> AsyncIterator[None]:
    await app[POOL].start()
    yield
    await app[POOL].stop()
    await app[STORE].settle()
    app[STORE].close()


async def _data_folder_lifetime(app: web.Application) -> AsyncIterator[None]:
    with data_folder_held(app[CONFIG].server.data_dir):
        yield


async def _uploads_lifetime(app: web.Application) -> AsyncIterator[None]:
    await app[UPLOADS].start()
    yield


def _background(name: str, work: Callable[[], Coroutine[Any, Any, None]]) -> CleanupContext:
    """A cleanup context running `work()` as a task while the app runs."""

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(work(), name=name)
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return lifetime


async def _close_streams(app: web.Application) -> None:
    """While the streams are still open: the running jobs end as `lost`, so that their
    subscribers get that end, `complete` and all. Then every other stream (of a queued
    job, which runs after the restart) ends without a terminal event: its client
    reconnects with `Last-Event-ID`, as an EventSource does by itself, and misses nothing."""
    await app[POOL].stop()
    app[REGISTRY].close_all()
