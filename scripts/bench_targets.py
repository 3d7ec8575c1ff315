"""The services scripts/bench.py measures, the gate its tools wait on, and /proc readings.

`serve()` starts a fresh service on a free loopback port with a config written to a
temporary folder: streamsvc (`python -m streamsvc server`, TOML) or the Node seed
(`node server.js`, JSON; `../shared/peers/seed-node`, installed with npm in a copy).
Both get the same tools (argv lists), one empty project, and room enough that no limit
shapes a figure: 64 workers, no client limits, a 1 TiB output cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "scripts" / "bench_tool.py"
TOOL_C = ROOT / "scripts" / "bench_tool.c"
SEED_NODE = ROOT.parent / "shared" / "peers" / "seed-node"
PY = sys.executable
PROJECT = "bench"
WORKERS = 64
#: the bound on a service's start, its stop, and the seed's `npm install`
START_BOUND_S = 30.0
STOP_BOUND_S = 15.0
NPM_BOUND_S = 300.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

#: a tool's argv by its id
Tools = Mapping[str, Sequence[str]]


def tool_command(choice: str, scratch: Path) -> tuple[list[str], str]:
    """How to run the bench tool: its C build (`choice` "c", or "auto" with a C compiler),
    else the Python one; and a note saying which."""
    python = [PY, "-S", str(TOOL)]  # -S: no site-packages, a quicker start
    compiler = shutil.which("cc") or shutil.which("gcc")
    if choice == "python" or compiler is None:
        why = "asked for" if choice == "python" else "no C compiler"
        return python, f"job tool: scripts/bench_tool.py ({why}; it costs far more CPU per line than the C one)"
    binary = scratch / "bench_tool"
    try:
        subprocess.run([compiler, "-O2", "-o", str(binary), str(TOOL_C), "-lm"], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        if choice == "c":
            raise RuntimeError(f"cannot build {TOOL_C}: {exc.stderr.decode(errors='replace')}") from None
        return python, "job tool: scripts/bench_tool.py (the C build failed)"
    return [str(binary)], f"job tool: scripts/bench_tool.c built with {compiler}"


def tool_argv(
    command: Sequence[str], count: int, size: int, *, rate: float = 0.0, gate: Path | None = None
) -> list[str]:
    """The bench tool printing `count` lines of `size` bytes (`rate` per second, 0: flat out)."""
    argv = [*command, str(count), str(size)]
    if rate:
        argv += ["--rate", f"{rate:g}"]
    if gate is not None:
        argv += ["--gate", str(gate)]
    return argv


class Gate:
    """A Unix socket the bench tools wait on: each connects and waits for one byte. `release()`
    sends it to every tool waiting and to any that comes later."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.waiting = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._arrived = asyncio.Event()
        self._released = False
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Gate:
        self.path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._on_tool, self.path)
        os.chmod(self.path, 0o777)  # tools may run as another user (--run-as); the folder is private
        return self

    async def __aexit__(self, *_: object) -> None:
        self.release()  # no tool is left waiting for its bound
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _on_tool(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.waiting += 1
        self._arrived.set()
        if self._released:
            self._go(writer)
        else:
            self._writers.append(writer)

    async def arrivals(self, count: int, bound_s: float) -> bool:
        """Whether `count` tools wait (or waited) within `bound_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound_s
        while self.waiting < count:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), max(0.0, deadline - loop.time()))
            if loop.time() >= deadline:
                break
        return self.waiting >= count

    def release(self) -> int:
        """Let every tool go; the wall-clock ns of the release."""
        released_ns = time.time_ns()
        self._released = True
        for writer in self._writers:
            self._go(writer)
        self._writers.clear()
        return released_ns

    @staticmethod
    def _go(writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            writer.write(b"g")
            writer.close()


class Proc:
    """A process's memory and CPU time, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise LookupError(f"no VmRSS in /proc/{self.pid}/status")

    def cpu_s(self) -> float:
        return sum(self._times()[:2]) / CLOCK_TICKS  # utime, stime

    def children_cpu_s(self) -> float:
        """The CPU time of its children that it has waited for (its tools)."""
        return sum(self._times()[2:]) / CLOCK_TICKS  # cutime, cstime

    def _times(self) -> list[int]:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return [int(field) for field in fields[11:15]]


def machine_busy_s() -> float:
    """CPU time every CPU of the machine has spent on anything but idling, since boot."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS  # all but idle, iowait


@dataclass(frozen=True)
class Target:
    #: "streamsvc" or "node"
    kind: str
    base: str
    proc: Proc

    async def submit(self, session: aiohttp.ClientSession, tool: str) -> str:
        """A new job of `tool` on the bench project; its id."""
        body = {"toolId": tool, "projectId": PROJECT}
        async with session.post(f"{self.base}/api/execute", json=body) as response:
            if response.status != 202:
                raise RuntimeError(
                    f"{self.kind}: POST /api/execute answered {response.status}: {await response.text()}"
                )
            job_id: str = (await response.json())["data"]["jobId"]
            return job_id

    def stream_url(self, job_id: str) -> str:
        return f"{self.base}/api/stream/{job_id}"


@contextlib.asynccontextmanager
async def py_spy(pid: int, output: Path) -> AsyncIterator[None]:
    """py-spy sampling `pid` (raw collapsed stacks, idle left out) while the block runs."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [spy, "record", "--pid", str(pid), "--format", "raw", "--nolineno", "--nonblocking", "--rate", "250"]
    process = await asyncio.create_subprocess_exec(
        *argv, "-o", str(output), stdout=subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    with contextlib.suppress(TimeoutError):  # it says so once it samples
        await asyncio.wait_for(process.stderr.readline(), 10)
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(process.communicate(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def serve(
    kind: str,
    folder: Path,
    tools: Tools,
    *,
    node_dir: Path | None = None,
    source: Path | None = None,
    run_as: str = "",
    python: str = PY,
) -> AsyncIterator[Target]:
    """A fresh `kind` service ("streamsvc", run by `python`, from the `streamsvc` package in
    `source` or else the installed one, its tools run as `run_as` if given; "node", from
    `node_dir`; or "bare", `bench_bare.py`) with `tools`, its files in `folder`; stopped with
    SIGTERM (then SIGKILL) at the end."""
    (folder / "projects" / PROJECT).mkdir(parents=True, exist_ok=True)
    port = free_port()
    if kind == "streamsvc":
        config = folder / "streamsvc.toml"
        config.write_text(_streamsvc_toml(tools, run_as))
        argv = [python, "-m", "streamsvc", "server", "--config", str(config), "--port", str(port)]
        argv += ["--log-level", "WARNING"]
        cwd = source or ROOT
    elif kind == "bare":
        config = folder / "bare.json"
        config.write_text(json.dumps({"tools": dict(tools)}))
        argv, cwd = [PY, str(ROOT / "scripts" / "bench_bare.py"), str(config), "--port", str(port)], folder
    else:
        assert node_dir is not None
        config = folder / "seed.json"
        config.write_text(json.dumps(_node_config(tools)))
        argv, cwd = ["node", "server.js", str(config), "--port", str(port)], node_dir
    log = os.open(folder / f"{kind}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        env = os.environ | ({"PYTHONPATH": str(source)} if source is not None and kind == "streamsvc" else {})
        process = await asyncio.create_subprocess_exec(*argv, cwd=cwd, env=env, stdout=log, stderr=log)
    finally:
        os.close(log)
    try:
        target = Target(kind, f"http://127.0.0.1:{port}", Proc(process.pid))
        await _wait_until_up(target, process, folder / f"{kind}.log")
        yield target
    finally:
        await _stop(process)


def _streamsvc_toml(tools: Tools, run_as: str = "") -> str:
    lines = [
        "[server]",
        'data_dir = "data"',
        f"run_as = {json.dumps(run_as)}",
        "retention_jobs = 10000",
        "[queue]",
        f"workers = {WORKERS}",
        "max_pending = 100000",
        "[limits]",
        "timeout_s = 600",
        f"max_output_bytes = {1 << 40}",
        "max_cpu_s = 3600",
        "[clients]",
        "max_active = 0",
        "max_per_hour = 0",
        "[projects]",
        'root = "projects"',
    ]
    for tool_id, argv in tools.items():
        lines += [f"[tools.{tool_id}]", f"argv = {json.dumps(list(argv))}"]  # a JSON string list is TOML
    return "\n".join(lines) + "\n"


def _node_config(tools: Tools) -> dict[str, Any]:
    return {"host": "127.0.0.1", "workers": WORKERS, "projectsRoot": "projects", "tools": dict(tools)}


async def _wait_until_up(target: Target, process: asyncio.subprocess.Process, log: Path) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_BOUND_S
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            if process.returncode is not None:
                break
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(f"{target.base}/api/queue/status") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{target.kind} did not start; see {log}")


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_BOUND_S)
    except TimeoutError:
        process.kill()
        await process.wait()


def describe_source(source: Path | None) -> str:
    """Which streamsvc is measured: a given folder, or this checkout's commit (and whether
    its working tree differs from it)."""
    if source is not None:
        return f"streamsvc from {source}"
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "streamsvc"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"streamsvc from {ROOT}"
    return f"streamsvc at {commit}" + (" with uncommitted changes in streamsvc/" if dirty else "")


def install_node_seed(source: Path, into: Path) -> tuple[Path | None, str]:
    """The seed copied to `into` with its dependencies installed; or None and why not."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None, "node or npm is not on PATH: the Node seed is not measured"
    if not (source / "server.js").is_file():
        return None, f"no Node seed at {source}: it is not measured"
    shutil.copytree(source, into, ignore=shutil.ignore_patterns("node_modules"))
    for path in [into, *into.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)  # the source may be read-only
    try:
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund"],
            cwd=into,
            check=True,
            capture_output=True,
            timeout=NPM_BOUND_S,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"npm install of the Node seed failed ({exc}): it is not measured"
    return into, f"Node seed installed in {into}"


def node_seed(option: str | None, scratch: Path) -> tuple[Path | None, str]:
    """Where the Node seed is ready to run: `--node-dir`, else $BENCH_NODE_DIR, else a copy of
    ../shared/peers/seed-node installed in `scratch`."""
    given = option or os.environ.get("BENCH_NODE_DIR")
    if given:
        folder = Path(given)
        if not (folder / "node_modules").is_dir():
            return None, f"{folder} has no node_modules (run npm install there): the Node seed is not measured"
        if shutil.which("node") is None:
            return None, "node is not on PATH: the Node seed is not measured"
        return folder, f"Node seed from {folder}"
    return install_node_seed(SEED_NODE, scratch / "seed-node")


def scratch_folder() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="streamsvc-bench-")
