"""Smoke test of a real service: start `python -m streamsvc server` (embedded default) on a
free loopback port, run every demo tool over HTTP, follow each over SSE, stop with SIGTERM.

    python scripts/smoke.py        # exits 0 when every check holds, 1 otherwise
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
import tempfile
from typing import Any

import aiohttp

#: what each demo tool must end as: (status, exit code)
EXPECTED = {
    "progress": ("completed", 0),
    "warnings": ("completed", 0),
    "fail": ("failed", 3),
    "line-count": ("completed", 0),
}
BOUND_S = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def follow(session: aiohttp.ClientSession, base: str, tool: str) -> tuple[dict[str, Any], list[int]]:
    """Run `tool` on the demo project; return its `complete` data and the event ids seen."""
    async with session.post(f"{base}/api/execute", json={"toolId": tool, "projectId": "hello"}) as response:
        assert response.status == 202, await response.text()
        job = (await response.json())["data"]
    ids: list[int] = []
    event = ""
    async with session.get(base + job["streamUrl"]) as response:
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                ids.append(int(line[4:]))
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "complete":
                data: dict[str, Any] = json.loads(line[6:])
                return data, ids
    raise AssertionError(f"{tool}: the stream ended without a complete event")


async def check(base: str) -> list[str]:
    problems = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=BOUND_S)) as session:
        results = await asyncio.gather(*(follow(session, base, tool) for tool in EXPECTED))
    for (tool, expected), (result, ids) in zip(EXPECTED.items(), results, strict=True):
        got = (result["status"], result["exitCode"])
        verdict = "ok" if got == expected and ids == list(range(1, len(ids) + 1)) else "WRONG"
        print(f"{verdict:5} {tool:10} {got[0]:9} exit={got[1]} events={len(ids)} lines={len(result['output'])}")
        if verdict != "ok":
            problems.append(f"{tool}: expected {expected}, got {got}, ids {ids}")
    return problems


async def main() -> int:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as workdir:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamsvc", "server", "--port", str(port), "--log-level", "WARNING",
            cwd=workdir, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            banner = await asyncio.wait_for(server.stdout.readline(), BOUND_S)
            print(banner.decode().strip())
            problems = await check(base)
        finally:
            server.send_signal(signal.SIGTERM)
            status = await asyncio.wait_for(server.wait(), BOUND_S)
        if status != 0:
            problems.append(f"the service exited with {status} on SIGTERM")
    for problem in problems:
        print("FAIL:", problem, file=sys.stderr)
    print("smoke: ok" if not problems else f"smoke: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
