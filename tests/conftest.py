"""Shared fixtures and helpers: a config factory, a live service over a real socket, an SSE reader,
the API's job records, whether a process is gone, and a real `python -m streamsvc server` process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web import Application

from streamsvc.app import create_app, server_options
from streamsvc.config import Config
from streamsvc.sandbox import Sandbox
from streamsvc.store import JOURNAL

PY = sys.executable
#: what a crash leaves when it strikes in the middle of writing a frame
TORN_FRAME = b'id: 99\nevent: output\ndata: {"line": "half of a li'
#: a well-formed job id no job has
UNKNOWN_JOB = "00000000-0000-4000-8000-000000000000"
#: the bound on any wait for something that should happen at once (a job to start, a process to end)
BOUND_S = 10.0
#: the bound on a service process's start, and on one HTTP exchange with it (generous: only matters when broken)
START_BOUND_S = 20.0
HTTP_BOUND_S = 30.0

#: scripts in the test project; each is a tool's behaviour under test
SCRIPTS = {
    "hello.py": """
        print("hello")
        print("world")
    """,
    "lines.py": """
        import sys
        for i in range(int(sys.argv[1])):
            print(f"line {i}")
    """,
    "both.py": """
        import sys
        print("out 1", flush=True)
        print("err 1", file=sys.stderr, flush=True)
        print("out 2", flush=True)
        sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    """,
    "gate.py": """
        # prints "waiting", then blocks until the file named by argv[1] exists
        import os, sys, time
        print("waiting", flush=True)
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.01)
        print("released", flush=True)
    """,
    "env.py": """
        import os
        for key in sorted(os.environ):
            print(f"{key}={os.environ[key]}")
    """,
}


def write_project(root: Path, name: str = "proj") -> Path:
    project = root / name
    project.mkdir(parents=True, exist_ok=True)
    for filename, body in SCRIPTS.items():
        (project / filename).write_text(textwrap.dedent(body))
    return project


ConfigFactory = Callable[..., Config]


@pytest.fixture
def make_config(tmp_path: Path) -> ConfigFactory:
    """Build a Config from TOML-shaped sections; tools are {id: argv} or {id: table}."""
    projects = tmp_path / "projects"
    write_project(projects)

    def factory(tools: dict[str, Any] | None = None, **sections: dict[str, Any]) -> Config:
        raw: dict[str, Any] = {"server": {"data_dir": str(tmp_path / "data")}, "projects": {"root": str(projects)}}
        for name, section in sections.items():
            raw[name] = raw.get(name, {}) | section
        raw["tools"] = {
            tool_id: spec if isinstance(spec, dict) else {"argv": spec} for tool_id, spec in (tools or {}).items()
        }
        return Config.from_mapping(raw, base=tmp_path)

    return factory


Client = TestClient[Any, Application]
ClientFactory = Callable[[Config], Awaitable[Client]]


@pytest.fixture
def start(aiohttp_client: Any) -> ClientFactory:
    """Start the service on a real socket, served as `python -m streamsvc server` serves it
    (handler cancellation on disconnect, the redacting access log); closed by the fixture."""

    async def factory(config: Config) -> Client:
        server = TestServer(create_app(config))  # its runner cancels handlers on disconnect
        await server.start_server(**server_options())
        client: Client = await aiohttp_client(server)
        return client

    return factory


@attrs.define
class Event:
    id: int | None
    event: str
    data: Any


async def read_sse(response: ClientResponse) -> AsyncIterator[Event | str]:
    """Parse an SSE body as a browser does; yields events, and comments as strings."""
    fields: dict[str, str] = {}
    data: list[str] = []
    async for line in _lines(response):
        if not line:
            if data:
                seq = fields.get("id")
                yield Event(int(seq) if seq else None, fields.get("event", "message"), json.loads("\n".join(data)))
            fields, data = {}, []
        elif line.startswith(":"):
            yield line
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value


async def _lines(response: ClientResponse) -> AsyncIterator[str]:
    """The body's lines, however long (an event's data may be megabytes)."""
    pending = b""
    async for chunk in response.content.iter_any():
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            yield line.decode().removesuffix("\r")


async def collect(response: ClientResponse) -> list[Event]:
    """All events until the server ends the response (heartbeat comments dropped)."""
    assert response.status == 200, await response.text()
    return [item async for item in read_sse(response) if isinstance(item, Event)]


async def submit(client: Client, tool: str, project: str = "proj") -> str:
    response = await client.post("/api/execute", json={"toolId": tool, "projectId": project})
    assert response.status == 202, await response.text()
    job_id: str = (await response.json())["data"]["jobId"]
    return job_id


async def follow(client: Client, job_id: str, **headers: str) -> list[Event]:
    async with client.get(f"/api/stream/{job_id}", headers=headers) as response:
        return await collect(response)


async def eventually(condition: Callable[[], bool], what: str, *, bound_s: float = 30.0) -> None:
    """Wait until `condition()` holds, checking every 10 ms; after `bound_s`, a TimeoutError naming `what`."""
    try:
        async with asyncio.timeout(bound_s):
            while not condition():  # noqa: ASYNC110 - test-side state with no event to wait on
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise TimeoutError(f"not within {bound_s} s: {what}") from None


def record_of(jobs_dir: Path, job_id: str) -> dict[str, Any]:
    """The job's newest record in the store's journal."""
    records = [json.loads(line) for line in (jobs_dir / JOURNAL).read_bytes().splitlines()]
    mine = [record for record in records if record["job_id"] == job_id]
    assert mine, f"no record of {job_id}"
    record: dict[str, Any] = mine[-1]
    return record


async def crash(client: Client, config: Config, job_id: str, log_tail: bytes = b"") -> dict[str, Any]:
    """Stop the service as a crash (kill -9, power loss) would: the running job's record and log
    stay as they were (the log followed by `log_tail`), not as a clean stop leaves them; the record."""
    jobs_dir = config.server.data_dir / "jobs"
    journal, log = (jobs_dir / JOURNAL).read_bytes(), (jobs_dir / f"{job_id}.log").read_bytes()
    saved = record_of(jobs_dir, job_id)
    await client.close()
    (jobs_dir / JOURNAL).write_bytes(journal)
    (jobs_dir / f"{job_id}.log").write_bytes(log + log_tail)
    return saved


def assert_ended_lost(events: list[Event]) -> None:
    """The events of a job the service lost: its last status `lost`, then `complete` saying so."""
    kinds = [e.event for e in events]
    assert kinds[-2:] == ["status", "complete"] and "error" not in kinds, kinds
    assert events[-2].data["status"] == "lost"
    result = events[-1].data
    assert result["status"] == "lost" and result["exitCode"] is None and result["error"], result


def lines_of(events: list[Event]) -> list[str]:
    return [e.data["line"] for e in events if e.event == "output"]


def assert_numbered(events: list[Event]) -> None:
    """The events are numbered 1, 2, 3, ... with none missing."""
    assert [e.id for e in events] == list(range(1, len(events) + 1)), [(e.id, e.event) for e in events]


# --- job records over the API ----------------------------------------------------------


async def data_of(response: ClientResponse, status: int = 200) -> Any:
    """The `data` of a success envelope, after checking the envelope itself."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert isinstance(body, dict) and set(body) == {"data"}, body
    return body["data"]


async def get_data(client: Client, path: str, **headers: str) -> Any:
    """GET `path`: it answers 200 with a success envelope; its `data`."""
    return await data_of(await client.get(path, headers=headers))


async def job_of(client: Client, job_id: str) -> dict[str, Any]:
    job: dict[str, Any] = await get_data(client, f"/api/jobs/{job_id}")
    return job


JobFetch = Callable[[Client, str], Awaitable[dict[str, Any]]]


async def wait_job(
    client: Client, job_id: str, until: str | dict[str, Any], *, fetch: JobFetch = job_of
) -> dict[str, Any]:
    """Poll the job (with `fetch`) until it has the status `until`, or given a dict, those field values;
    the job then. Fails after BOUND_S."""
    wanted = {"status": until} if isinstance(until, str) else until
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND_S
    while True:
        job = await fetch(client, job_id)
        if all(job[name] == value for name, value in wanted.items()):
            return job
        assert loop.time() < deadline, f"job {job_id} never had {wanted} within {BOUND_S} s: {job}"
        await asyncio.sleep(0.01)


async def submit_running(client: Client, tool: str) -> str:
    """Submit `tool` and wait until its job runs; its id. (A `gate.py` job then holds its worker.)"""
    job_id = await submit(client, tool)
    await wait_job(client, job_id, "running")
    return job_id


# --- processes --------------------------------------------------------------------------


def is_gone(pid: int) -> bool:
    """Whether process `pid` has exited: it no longer exists, or is a zombie no one has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


async def assert_gone(pid: int) -> None:
    """Wait (bounded) until `pid` is gone: a signal takes a moment to land."""
    await eventually(lambda: is_gone(pid), f"process {pid} is gone", bound_s=BOUND_S)


def cgroup_controllers() -> set[str]:
    """The controllers the service can make per-job groups in on this host."""
    sandbox = Sandbox.detect("")
    try:
        return set(sandbox.cgroup_parents)
    finally:
        sandbox.close()


# --- a real service process -------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def child_env(**extra: str) -> dict[str, str]:
    """This environment without STREAMSVC_CONFIG, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "STREAMSVC_CONFIG"}
    return env | extra


@attrs.define
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    err: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def kill_9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=BOUND_S)

    def stop(self) -> None:
        """End the process for sure: TERM, a bounded wait, then KILL."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=BOUND_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=BOUND_S)


Launch = Callable[..., Awaitable[Server]]


def spawn(args: tuple[str, ...], cwd: Path | None, env: dict[str, str], logs: Path, port: int | None = None) -> Server:
    """Start `python -m streamsvc server ARGS` on `port` or a free one, its output in `logs`.out and `logs`.err."""
    port = port or free_port()
    out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
    argv = [PY, "-m", "streamsvc", "server", *args, "--host", "127.0.0.1", "--port", str(port)]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr)
    return Server(proc, port, out, err)


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start `python -m streamsvc server ARGS --host 127.0.0.1 --port <port or a free one>` (in `cwd`,
    with `env` or `child_env()`) and wait until it says it serves; stopped by the fixture."""
    servers: list[Server] = []
    logs = tmp_path / "logs"

    async def factory(
        *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, port: int | None = None
    ) -> Server:
        logs.mkdir(exist_ok=True)
        server = spawn(args, cwd, env or child_env(), logs / str(len(servers)), port)
        servers.append(server)
        proc, serving = server.proc, f"serving on {server.url}"
        await eventually(
            lambda: proc.poll() is not None or serving in server.stdout(),
            "the service announces it serves",
            bound_s=START_BOUND_S,
        )
        assert proc.poll() is None, f"exited with {proc.poll()}: {server.stdout()} {server.stderr()}"
        return server

    try:
        yield factory
    finally:
        for server in servers:
            server.stop()


@contextlib.asynccontextmanager
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_BOUND_S)) as http:
        yield http


async def post_job(http: aiohttp.ClientSession, server: Server, tool: str, project: str = "proj") -> str:
    body = {"toolId": tool, "projectId": project}
    async with http.post(f"{server.url}/api/execute", json=body) as response:
        assert response.status == 202, await response.text()
        job_id: str = (await response.json())["data"]["jobId"]
    return job_id


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    """GET `url`: it answers 200; the `data` of its body."""
    async with http.get(url) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["data"]


async def stream_of(http: aiohttp.ClientSession, server: Server, job_id: str, **headers: str) -> list[Event]:
    async with http.get(f"{server.url}/api/stream/{job_id}", headers=headers) as response:
        return await collect(response)
