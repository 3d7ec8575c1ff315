"""Shared fixtures: a config factory, a live service over a real socket, an SSE reader."""

from __future__ import annotations

import asyncio
import json
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from aiohttp.web import Application

from streamsvc.app import create_app
from streamsvc.config import Config

PY = sys.executable

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


ClientFactory = Callable[[Config], Awaitable[TestClient[Any, Application]]]


@pytest.fixture
def start(aiohttp_client: Any) -> ClientFactory:
    """Start the service on a real socket; closed (and its jobs ended) by the fixture."""

    async def factory(config: Config) -> TestClient[Any, Application]:
        client: TestClient[Any, Application] = await aiohttp_client(
            create_app(config), server_kwargs={"handler_cancellation": True}
        )
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


async def submit(client: TestClient[Any, Application], tool: str, project: str = "proj") -> str:
    response = await client.post("/api/execute", json={"toolId": tool, "projectId": project})
    assert response.status == 202, await response.text()
    job_id: str = (await response.json())["data"]["jobId"]
    return job_id


async def follow(client: TestClient[Any, Application], job_id: str, **headers: str) -> list[Event]:
    async with client.get(f"/api/stream/{job_id}", headers=headers) as response:
        return await collect(response)


async def eventually(condition: Callable[[], bool], what: str, *, bound_s: float = 30.0) -> None:
    """Wait until `condition()` holds, checking every 10 ms, failing after `bound_s`."""
    async with asyncio.timeout(bound_s):
        while not condition():  # noqa: ASYNC110 - test-side state with no event to wait on
            await asyncio.sleep(0.01)
    assert condition(), what


def lines_of(events: list[Event]) -> list[str]:
    return [e.data["line"] for e in events if e.event == "output"]
