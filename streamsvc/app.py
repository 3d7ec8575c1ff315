"""The application factory: wires the pieces together, nothing more."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
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
from .logs import AccessLogger
from .metrics import Metrics
from .pool import WorkerPool
from .projects import Projects, UploadedProjects
from .registry import SessionRegistry
from .store import JobStore
from .webui import routes as page_routes

SHUTDOWN_MESSAGE = "the service is shutting down; reconnect with Last-Event-ID to resume"


def server_options() -> dict[str, Any]:
    """The access log of the HTTP server around the app (`web.run_app`, test servers):
    one line per request, secrets hidden."""
    return {"access_log_class": AccessLogger, "access_log": logging.getLogger("aiohttp.access")}


def create_app(config: Config) -> web.Application:
    app = web.Application(
        middlewares=[error_envelope, bearer_auth],
        client_max_size=MAX_JSON_BYTES,
        # long enough that an absurd id still reaches the handlers and gets the envelope
        handler_args={"max_line_size": 65536, "max_field_size": 65536},
    )
    store = JobStore(config.server.data_dir, config.server.retention_jobs, config.limits.max_result_lines)
    uploaded = UploadedProjects(config.server.data_dir, config.uploads, store)
    projects = Projects(config.projects.root, uploaded)
    app[CONFIG] = config
    app[STORE] = store
    app[PROJECTS] = projects
    app[UPLOADS] = uploaded
    metrics = Metrics()
    app[METRICS] = metrics
    app[POOL] = WorkerPool(config, store, projects, metrics)
    app[REGISTRY] = SessionRegistry()
    metrics.watch(app[POOL], app[REGISTRY])
    app.add_routes(routes)
    app.add_routes(page_routes)
    app.cleanup_ctx.append(_uploads_lifetime)  # before the pool: a recovered job may run on an upload
    app.cleanup_ctx.append(_pool_lifetime)
    app.cleanup_ctx.append(_sweeper_lifetime)  # after the pool: recovered jobs keep their projects
    app.on_shutdown.append(_close_streams)
    return app


async def _pool_lifetime(app: web.Application) -> AsyncIterator[None]:
    await app[POOL].start()
    yield
    await app[POOL].stop()
    app[STORE].close()


async def _uploads_lifetime(app: web.Application) -> AsyncIterator[None]:
    await app[UPLOADS].start()
    yield


async def _sweeper_lifetime(app: web.Application) -> AsyncIterator[None]:
    sweeper = asyncio.create_task(app[UPLOADS].sweep_forever(), name="upload-sweeper")
    yield
    sweeper.cancel()
    await asyncio.gather(sweeper, return_exceptions=True)


async def _close_streams(app: web.Application) -> None:
    app[POOL].close()
    app[REGISTRY].close_all(SHUTDOWN_MESSAGE)
