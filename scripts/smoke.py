"""Smoke test of a real service through the command line: start `python -m streamsvc server`
(embedded default) on a free loopback port, run every demo tool with `python -m streamsvc run`,
check each one's exit status, stdout and stderr, check `jobs --json` lists them with the right
statuses, then stop the service with SIGTERM (it must exit 0).

    python scripts/smoke.py        # prints "smoke: ok" and exits 0 when every check holds, else 1
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sys
import tempfile
from typing import NamedTuple

from streamsvc.client import Client
from streamsvc.config import DEMO_DIR

#: a bound on the whole run, and on the service's start and stop
BOUND_S = 60.0


class Expected(NamedTuple):
    status: str
    exit_code: int
    stdout: list[str]
    stderr: list[str]


def expected() -> dict[str, Expected]:
    """What each demo tool prints and how it ends (see streamsvc/demo/projects/hello/)."""
    bar = [f"\x1b[36m[{'#' * i}{'.' * (20 - i)}]\x1b[0m step {i}/20" for i in range(1, 21)]
    files = ("README.md", "progress.py", "warnings.py", "fail.py")
    readme_lines = (DEMO_DIR / "projects" / "hello" / "README.md").read_bytes().count(b"\n")
    return {
        "progress": Expected("completed", 0, [*bar, "\x1b[32mbuild finished\x1b[0m"], []),
        "warnings": Expected(
            "completed",
            0,
            [*(f"checked {name}" for name in files), "4 files checked, 0 errors, 4 warnings"],
            [f"warning: {name}: line 1: consider a docstring" for name in files],
        ),
        "fail": Expected(
            "failed", 3, ["verifying hello ..."], ["error: assertion 'answer == 42' does not hold (answer = 41)"]
        ),
        "line-count": Expected("completed", 0, [f"{readme_lines} README.md"], []),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def cli(*args: str) -> tuple[int, str, str]:
    """`python -m streamsvc ARGS` to its end: exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamsvc", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:  # cancelled by the bound
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def run_tool(url: str, tool: str, want: Expected) -> tuple[str, list[str]]:
    """Run `tool` through the CLI and check what it printed; its job id and the problems found."""
    code, out, err = await cli("run", tool, "hello", "--url", url)
    first, *stderr = err.splitlines() or [""]
    queued = re.fullmatch(r"streamsvc: job (\S+) queued", first)
    stdout = out.splitlines()
    if tool == "line-count":
        stdout = [" ".join(line.split()) for line in stdout]  # wc pads its count on some systems
    problems = [
        f"{tool}: {what} is {got!r}, expected {wanted!r}"
        for what, got, wanted in (
            ("the exit status", code, want.exit_code),
            ("stdout", stdout, want.stdout),
            ("stderr", stderr, want.stderr),
        )
        if got != wanted
    ]
    if not queued:
        problems.append(f"{tool}: the first line on stderr is {first!r}, not 'streamsvc: job <id> queued'")
    verdict = "WRONG" if problems else "ok"
    print(f"{verdict:5} {tool:10} exit={code} stdout={len(stdout)} stderr={len(stderr)}", flush=True)
    return (queued[1] if queued else ""), problems


async def check(url: str) -> list[str]:
    wanted = expected()
    async with Client(url) as client:
        tools = sorted(tool["id"] for tool in await client.tools())
    if tools != sorted(wanted):
        return [f"the service offers the tools {tools}, expected {sorted(wanted)}"]
    runs = await asyncio.gather(*(run_tool(url, tool, want) for tool, want in wanted.items()))
    problems = [problem for _, found in runs for problem in found]
    code, out, err = await cli("jobs", "--json", "--url", url)
    if code != 0:
        return [*problems, f"jobs --json exited with {code}: {err.strip()}"]
    listed = {job["jobId"]: job for job in json.loads(out)}
    for (tool, want), (job_id, _) in zip(wanted.items(), runs, strict=True):
        got = (listed[job_id]["toolId"], listed[job_id]["status"]) if job_id in listed else ("no", "such job")
        if got != (tool, want.status):
            problems.append(f"jobs --json: job {job_id or '?'} is {' '.join(got)}, expected {tool} {want.status}")
    return problems


async def main() -> int:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as workdir:
        server = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streamsvc", "server", "--port", str(port), "--log-level", "WARNING",
            cwd=workdir, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            async with asyncio.timeout(BOUND_S):
                problems = await serve_and_check(server, url)
        except TimeoutError:
            problems = [f"the checks did not finish within {BOUND_S:g} s"]
        finally:
            stopped = await stop(server)
        if stopped:
            problems.append(stopped)
    for problem in problems:
        print("FAIL:", problem, file=sys.stderr)
    print("smoke: ok" if not problems else f"smoke: {len(problems)} problem(s)")
    return 1 if problems else 0


async def serve_and_check(server: asyncio.subprocess.Process, url: str) -> list[str]:
    assert server.stdout is not None
    banner = (await server.stdout.readline()).decode().strip()
    if f"serving on {url}" not in banner:
        return [f"the service did not start (exit status {await server.wait()}); it said {banner!r}"]
    print(banner, flush=True)
    return await check(url)


async def stop(server: asyncio.subprocess.Process) -> str | None:
    """SIGTERM, a bounded wait, then SIGKILL; what went wrong, if anything."""
    if server.returncode is not None:
        return f"the service had exited (status {server.returncode}) before it was stopped"
    server.send_signal(signal.SIGTERM)
    try:
        status = await asyncio.wait_for(server.wait(), BOUND_S)
    except TimeoutError:
        server.kill()
        await server.wait()
        return f"the service did not exit within {BOUND_S:g} s of SIGTERM"
    return None if status == 0 else f"the service exited with {status} on SIGTERM, expected 0"


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
