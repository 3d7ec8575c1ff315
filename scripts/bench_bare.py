"""A bare job server for the jobrate scenario's second ceiling: what this machine's cores allow
a job server in aiohttp, with the bench's own client, when the server does nothing else.

    python scripts/bench_bare.py CONFIG.json --port N      (CONFIG: {"tools": {id: argv}})

`POST /api/execute` spawns the tool (vfork, its output discarded) and answers 202 with a job
id; `GET /api/stream/{jobId}` sends the SSE head, then `complete` when the tool exits. No log,
no job records, no confinement, no validation beyond the tool id: none of what streamsvc
guarantees. `GET /api/queue/status` answers once it is up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path

from aiohttp import web

#: jobs submitted and not yet streamed, at most (more are refused with 503)
MAX_JOBS = 100_000

JOBS = web.AppKey("jobs", dict[str, "asyncio.Future[int]"])
TOOLS = web.AppKey("tools", dict[str, list[str]])


async def execute(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        body = None
    tool = body.get("toolId") if isinstance(body, dict) else None
    argv = request.app[TOOLS].get(tool) if isinstance(tool, str) else None
    if argv is None:
        return web.json_response({"error": {"code": "UNKNOWN_TOOL"}}, status=400)
    jobs = request.app[JOBS]
    if len(jobs) >= MAX_JOBS:
        return web.json_response({"error": {"code": "QUEUE_FULL"}}, status=503)
    job_id = str(uuid.uuid4())
    jobs[job_id] = _spawn(argv)
    return web.json_response({"data": {"jobId": job_id, "status": "queued"}}, status=202)


def _spawn(argv: list[str]) -> asyncio.Future[int]:
    """Start `argv` (in the loop, as streamsvc does); a future of its exit status."""
    loop = asyncio.get_running_loop()
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exited: asyncio.Future[int] = loop.create_future()
    pidfd = os.pidfd_open(child.pid)

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        exited.set_result(child.wait())

    loop.add_reader(pidfd, reap)
    return exited


async def stream(request: web.Request) -> web.StreamResponse:
    exited = request.app[JOBS].pop(request.match_info["jobId"], None)
    if exited is None:
        return web.json_response({"error": {"code": "JOB_NOT_FOUND"}}, status=404)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    code = await exited
    status = "completed" if code == 0 else "failed"
    await response.write(f'event: complete\ndata: {{"status":"{status}","exitCode":{code}}}\n\n'.encode())
    await response.write_eof()
    return response


async def queue_status(request: web.Request) -> web.Response:
    return web.json_response({"data": {"pending": len(request.app[JOBS])}})


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application()
    app[TOOLS] = {tool: list(argv) for tool, argv in json.loads(args.config.read_text())["tools"].items()}
    app[JOBS] = {}
    app.router.add_post("/api/execute", execute)
    app.router.add_get("/api/stream/{jobId}", stream)
    app.router.add_get("/api/queue/status", queue_status)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
