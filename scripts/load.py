"""Load and leak check of a real streamsvc service, on 127.0.0.1 only, bounded in time and count.

It starts `python -m streamsvc server` on a free loopback port, with a config, a project and a
data folder it writes to a temporary folder, and runs against it:

(a) streams: N subscribers connect to a running job, a batch at a time, read a little of it
    and leave mid-job (half close their connection, half reset it) while an observer follows
    the job to its end;
(b) jobs: N short jobs, each submitted and followed to `complete`, with bounded concurrency;
(c) flood: a job writes 50 MB while a subscriber on a socket with a tiny receive buffer reads
    nothing and another reads everything. The job must run at the speed it has without the
    silent one, the reading one must get everything and `complete` meanwhile, the service's
    RSS must peak within +40 MiB, and the silent one must then get every line exactly once,
    in order: by catching up from the log, or, on a second service with `stream_stall_s = 2`,
    by being cut off and resuming with Last-Event-ID;
(c') wide lines: on a third service, a flood of 1500-byte lines, whose `complete` event holds
    10 000 of them (15 MB): the RSS must still peak within +40 MiB.

After each, the service's open file descriptors and RSS must be back near a baseline taken after
a warm-up round of the same kind (fds +10, RSS +30 MiB), no child process of the service may be
left but its `streamsvc.reaper` watchdog, and no job cgroup. Every wait has a bound.

    python scripts/load.py                       # the full run: about 90 s on 2 cores
    python scripts/load.py --streams 200 --jobs 200 --flood-mb 10 --wide-mb 0

It prints one JSON line per scenario, then a summary, and exits 1 when a check fails.
tests/test_load.py runs the same scenarios in-process (where asyncio tasks can be counted too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from streamsvc.sandbox import MAX_SPARE_JAILS

MIB = 1024 * 1024
#: how far above its baseline a resource may stay after a round ("near", generously: Python's
#: allocator keeps memory it once had)
FD_SLACK = 10
TASK_SLACK = 5
RSS_SLACK_MIB = 30.0
#: how far above its baseline the service's RSS may peak while a job writes the flood
FLOOD_RSS_SLACK_MIB = 40.0
#: how long resources may take to come back after a round
SETTLE_S = 15.0
#: the bound on any one wait on the service (a request, a job to start, a stream to end)
WAIT_S = 60.0
#: the receive buffer of the subscriber that reads nothing (the kernel doubles it)
SILENT_RCVBUF = 4096
#: a job with the silent subscriber may take this much longer than without it: factor, seconds
SLOWDOWN = (2.0, 5.0)

PY = sys.executable
#: the short job of scenario (b)
SHORT_ARGV = [PY, "-S", "-c", "print('x')"]  # -S: no site-packages, half the start-up
#: a quicker one, for more jobs in less time
ECHO_ARGV = [shutil.which("echo") or "/bin/echo", "x"]
#: the running job of scenario (a): HOLD_LINES lines at once, then one every HOLD_EVERY_S
#: seconds until it is cancelled, so that subscribers leave while the job writes
HOLD_LINES = 200
HOLD_EVERY_S = 0.005
HOLD_SCRIPT = """\
import sys, time
first, every = int(sys.argv[1]), float(sys.argv[2])
for i in range(first):
    print(f"hold {i:06d} " + "h" * 80)
i = first
while True:
    sys.stdout.flush()
    time.sleep(every)
    print(f"hold {i:06d} " + "h" * 80)
    i += 1
"""
#: the flood of scenario (c): argv[1] lines of argv[2] bytes each (newline included)
FLOOD_SCRIPT = """\
import sys
count, width = int(sys.argv[1]), int(sys.argv[2])
pad = "x" * (width - 11)
write = sys.stdout.write
for i in range(count):
    write(f"{i:09d} {pad}\\n")
"""
#: bytes per flood line, newline included: log-like lines (the `complete` event then holds
#: max_result_lines of them, 2 MB)
FLOOD_WIDTH = 200
#: the wide variant: `complete` holds max_result_lines (10 000) of these, 15 MB, which a service
#: needs about twice over (the lines and their encoded event) to stay well within +40 MiB
WIDE_WIDTH = 1500
PROJECT = "proj"


def hold_line(i: int) -> str:
    return f"hold {i:06d} " + "h" * 80


def flood_line(width: int) -> Callable[[int], str]:
    pad = "x" * (width - 11)
    return lambda i: f"{i:09d} {pad}"


def flood_lines(flood_mb: float, width: int = FLOOD_WIDTH) -> int:
    return max(1, math.floor(flood_mb * MIB / width))


def tool_tables(
    flood_count: int, width: int = FLOOD_WIDTH, short_argv: list[str] = SHORT_ARGV
) -> dict[str, dict[str, Any]]:
    """The tools the scenarios run, as `[tools.ID]` tables (for a TOML file or `make_config`)."""
    flood_bytes = flood_count * width
    return {
        "hold": {"argv": [PY, "-c", HOLD_SCRIPT, str(HOLD_LINES), str(HOLD_EVERY_S)], "timeout_s": 600},
        "short": {"argv": short_argv},
        "flood": {
            "argv": [PY, "-c", FLOOD_SCRIPT, str(flood_count), str(width)],
            "max_output_bytes": max(60_000_000, flood_bytes + MIB),
            "timeout_s": 300,
        },
    }


# --- measuring the service's process ------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """What the service holds at one moment."""

    fds: int
    rss_mib: float
    #: asyncio tasks (only measurable in-process)
    tasks: int | None
    #: its child processes but the reaper, as "pid name state"
    children: tuple[str, ...]
    #: job cgroups under its parent groups that are left over: those that still hold or
    #: count a process, and empty ones beyond the spares kept for reuse (None where it has none)
    cgroups: int | None

    def brief(self) -> dict[str, Any]:
        return {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items() if v is not None}


class Probe:
    """Reads a process's resources from /proc (and, for the current process, its tasks)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.in_process = pid == os.getpid()

    def snapshot(self) -> Snapshot:
        tasks = len(asyncio.all_tasks()) if self.in_process else None
        return Snapshot(self.fds(), self.rss_mib(), tasks, self.children(), self.cgroups())

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_mib(self) -> float:
        return self._status_kib("VmRSS") / 1024

    def high_water_mib(self) -> float:
        return self._status_kib("VmHWM") / 1024

    def reset_high_water(self) -> bool:
        """Set VmHWM back to VmRSS (needs the right to write /proc/PID/clear_refs)."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def _status_kib(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise LookupError(f"{key} not in /proc/{self.pid}/status")

    def children(self) -> tuple[str, ...]:
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                status = Path(entry.path, "status").read_text()
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue  # it ended while we looked
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            if fields.get("PPid") != str(self.pid) or b"streamsvc.reaper" in cmdline:
                continue
            found.append(f"{entry.name} {fields.get('Name', '?')} {fields.get('State', '?').split()[0]}")
        return tuple(sorted(found))

    def cgroups(self) -> int | None:
        """Job groups in the service's parent groups (`streamsvc-<pid>-*`, cgroup v1) left
        over: those that hold or count a process, and empty ones beyond the MAX_SPARE_JAILS
        a parent may keep for later jobs."""
        parents: list[Path] = []
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/cgroup").read_text().splitlines():
                _, names, path = line.split(":", 2)
                for controller in ("pids", "memory"):
                    if controller in names.split(","):
                        base = Path("/sys/fs/cgroup", controller, path.lstrip("/"))
                        parents.extend(base.glob(f"streamsvc-{self.pid}-*"))
        if not parents:
            return None
        left = 0
        for parent in parents:
            with contextlib.suppress(OSError):
                groups = [entry for entry in parent.iterdir() if entry.is_dir()]
                busy = sum(1 for group in groups if _holds_a_process(group))
                left += busy + max(0, len(groups) - busy - MAX_SPARE_JAILS)
        return left


def _holds_a_process(group: Path) -> bool:
    """Whether a process is in `group`, or still counted by it (a zombie waiting for its
    parent is no longer listed in cgroup.procs, but pids.current counts it)."""
    try:
        if (group / "cgroup.procs").read_bytes().strip():
            return True
        counted = group / "pids.current"
        return counted.exists() and counted.read_bytes().strip() != b"0"
    except OSError:
        return False  # removed while we looked


class RssSampler:
    """The peak RSS of a process while the block runs: the kernel's high-water mark, reset at
    the start (where /proc/PID/clear_refs may be written), and samples every few milliseconds."""

    def __init__(self, probe: Probe, every_s: float = 0.01) -> None:
        self.probe = probe
        self.every_s = every_s
        self.peak_mib = 0.0
        self._task: asyncio.Task[None] | None = None
        self._high_water = False

    async def __aenter__(self) -> RssSampler:
        self._high_water = self.probe.reset_high_water()
        self.peak_mib = self.probe.rss_mib()
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.peak_mib = max(self.peak_mib, self.probe.rss_mib())
        if self._high_water:
            self.peak_mib = max(self.peak_mib, self.probe.high_water_mib())

    async def _sample(self) -> None:
        while True:
            self.peak_mib = max(self.peak_mib, self.probe.rss_mib())
            await asyncio.sleep(self.every_s)


async def quiesce(probe: Probe, bound_s: float = SETTLE_S) -> Snapshot:
    """A baseline: once the fds and the child processes held still for 0.3 s (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound_s
    previous = probe.snapshot()
    steady = 0
    while steady < 3 and loop.time() < deadline:
        await asyncio.sleep(0.1)
        current = probe.snapshot()
        steady = steady + 1 if (current.fds, current.children) == (previous.fds, previous.children) else 0
        previous = current
    return previous


def leaks(baseline: Snapshot, after: Snapshot) -> list[str]:
    """What `after` still holds beyond `baseline` and the slack."""
    problems = []
    if after.fds > baseline.fds + FD_SLACK:
        problems.append(f"open fds {baseline.fds} -> {after.fds} (more than +{FD_SLACK})")
    if after.tasks is not None and baseline.tasks is not None and after.tasks > baseline.tasks + TASK_SLACK:
        problems.append(f"asyncio tasks {baseline.tasks} -> {after.tasks} (more than +{TASK_SLACK})")
    if after.rss_mib > baseline.rss_mib + RSS_SLACK_MIB:
        problems.append(f"RSS {baseline.rss_mib:.1f} -> {after.rss_mib:.1f} MiB (more than +{RSS_SLACK_MIB:g} MiB)")
    # (against the baseline, in case something before the scenario left one)
    if new_children := sorted(set(after.children) - set(baseline.children)):
        problems.append(f"child processes left: {', '.join(new_children)}")
    if (after.cgroups or 0) > (baseline.cgroups or 0):
        problems.append(f"job cgroups still holding a process: {baseline.cgroups} -> {after.cgroups}")
    return problems


async def settle(probe: Probe, baseline: Snapshot, bound_s: float = SETTLE_S) -> tuple[Snapshot, float]:
    """Wait (bounded) until the process is back near `baseline`; the last snapshot and the wait."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        after = probe.snapshot()
        # RSS is not waited for: memory the allocator keeps does not come back by waiting
        if not leaks(baseline, dataclasses.replace(after, rss_mib=baseline.rss_mib)) or loop.time() - started > bound_s:
            return after, round(loop.time() - started, 2)
        await asyncio.sleep(0.05)


# --- reading a stream ---------------------------------------------------------------------


#: an event of one `data:` line, preceded by `id:` and `event:` (what streamsvc writes)
_PLAIN_FRAME = re.compile(rb"(?<![^\n])id: (\d+)\nevent: (\w+)\ndata: ([^\n]*)\n\n")


def _plain_line_is(data: bytes, want: bytes) -> bool:
    """Whether `data` is a JSON object whose first field is `"line": want` (False: not sure)."""
    return (
        b"\\" not in want
        and b'"' not in want
        and data.startswith(b'{"line":"')
        and data.startswith(want, 9)
        and data.startswith(b'",', 9 + len(want))
    )


class StreamChecker:
    """Checks one job's SSE stream as it arrives, holding only the unfinished event: ids 1, 2,
    3, ... with no gap and no duplicate, output lines exactly `expected(0)`, `expected(1)`, ...
    in order, nothing after the terminal event. Lines may end in LF or CRLF (the heartbeat's)."""

    MAX_PROBLEMS = 10

    def __init__(self, expected: Callable[[int], str]) -> None:
        self.expected = expected
        #: id of the last whole event received (what a resume sends as Last-Event-ID)
        self.last_id = 0
        self.lines = 0
        self.bytes = 0
        self.complete: dict[str, Any] | None = None
        self.error: str | None = None
        self.problems: list[str] = []
        self._buf = bytearray()

    @property
    def ended(self) -> bool:
        return self.complete is not None or self.error is not None

    def reconnect(self) -> None:
        """Forget the unfinished event of a connection that broke; the next one resumes."""
        self._buf.clear()

    def feed(self, data: bytes) -> None:
        self.bytes += len(data)
        self._buf += data
        end = self._buf.rfind(b"\n\n", max(0, len(self._buf) - len(data) - 1))
        if end < 0:
            return  # the event is not whole yet (a large one arrives in many pieces)
        region = bytes(self._buf[: end + 2])
        del self._buf[: end + 2]
        done = 0
        for frame in _PLAIN_FRAME.finditer(region):  # the common shape, parsed in C
            if frame.start() > done:
                self._blocks(region[done : frame.start()])
            done = frame.end()
            seq, kind, data = int(frame[1]), frame[2], frame[3]
            if kind == b"output" and seq == self.last_id + 1 and not self.ended:
                want = self.expected(self.lines).encode()
                if _plain_line_is(data, want):  # the usual case, in short
                    self.last_id, self.lines = seq, self.lines + 1
                    continue
            self._event(seq, kind.decode(), data)
        if done < len(region):
            self._blocks(region[done:])

    def _blocks(self, region: bytes) -> None:
        """Events of any other shape, as a browser reads them (a CRLF blank line ends one too)."""
        for block in region.replace(b"\r\n", b"\n").split(b"\n\n"):
            fields: dict[bytes, bytes] = {}
            data: list[bytes] = []
            for line in block.split(b"\n"):
                if not line or line.startswith(b":"):
                    continue  # a comment (the heartbeat)
                name, _, value = line.partition(b":")
                value = value.removeprefix(b" ")
                if name == b"data":
                    data.append(value)
                else:
                    fields[name] = value
            if data:  # else `retry:` alone, or nothing
                raw_id = fields.get(b"id", b"")
                seq = int(raw_id) if raw_id.isdigit() else -1
                self._event(seq, fields.get(b"event", b"message").decode(), b"\n".join(data))

    def _event(self, seq: int, kind: str, data: bytes) -> None:
        if seq != self.last_id + 1:
            self._problem(f"event id {seq} ({kind}) after id {self.last_id}")
        self.last_id = max(seq, self.last_id)
        if self.ended:
            self._problem(f"event {seq} ({kind}) after the terminal event")
        if kind == "output":
            want = self.expected(self.lines)
            if not _plain_line_is(data, want.encode()):
                got = json.loads(data).get("line")
                if got != want:
                    self._problem(f"output line {self.lines} is {str(got)[:40]!r}, not {want[:40]!r}")
            self.lines += 1
        elif kind == "complete":
            self.complete = json.loads(data)
        elif kind == "error":
            self.error = str(json.loads(data).get("message"))

    def _problem(self, text: str) -> None:
        if len(self.problems) < self.MAX_PROBLEMS:
            self.problems.append(text)


async def follow(
    http: aiohttp.ClientSession, base: str, job_id: str, checker: StreamChecker, *, resume: bool = False
) -> None:
    """Read the job's stream into `checker` until the server ends it (from the checker's last
    event on, with Last-Event-ID, when `resume`)."""
    headers = {"Last-Event-ID": str(checker.last_id)} if resume else {}
    checker.reconnect()
    async with http.get(f"{base}/api/stream/{job_id}", headers=headers) as response:
        if response.status != 200:
            raise AssertionError(f"stream {job_id}: HTTP {response.status}: {(await response.text())[:200]}")
        async for chunk in response.content.iter_any():
            checker.feed(chunk)


class Dechunker:
    """The body of an HTTP/1.1 response read off a raw socket: headers checked, chunks undone."""

    def __init__(self) -> None:
        self.status: int | None = None
        #: the last chunk (the end of the body) arrived
        self.ended = False
        self._buf = bytearray()
        self._chunked = False
        self._left = 0
        self._state = "size"

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        if self.status is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return b""
            head = self._buf[:end].decode("latin-1").split("\r\n")
            del self._buf[: end + 4]
            self.status = int(head[0].split()[1])
            self._chunked = any(h.lower().replace(" ", "") == "transfer-encoding:chunked" for h in head[1:])
        if not self._chunked:
            body = bytes(self._buf)
            self._buf.clear()
            return body
        out = bytearray()
        while not self.ended:
            if self._state == "size":
                newline = self._buf.find(b"\r\n")
                if newline < 0:
                    break
                self._left = int(bytes(self._buf[:newline]).split(b";")[0], 16)
                del self._buf[: newline + 2]
                self._state = "data" if self._left else "end"
                self.ended = not self._left
            elif self._state == "data":
                take = min(self._left, len(self._buf))
                if not take:
                    break
                out += self._buf[:take]
                del self._buf[:take]
                self._left -= take
                if not self._left:
                    self._state = "crlf"
            else:
                if len(self._buf) < 2:
                    break
                del self._buf[:2]
                self._state = "size"
        return bytes(out)


class SilentSubscriber:
    """A subscriber on a raw socket with a tiny receive buffer that reads nothing until `read`."""

    def __init__(self, host: str, port: int, job_id: str) -> None:
        self.address = (host, port)
        self.job_id = job_id
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SILENT_RCVBUF)
        self.sock.setblocking(False)
        self.connected_at = 0.0

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, self.address)
        request = f"GET /api/stream/{self.job_id} HTTP/1.1\r\nHost: {self.address[0]}\r\n\r\n"
        await loop.sock_sendall(self.sock, request.encode())
        self.connected_at = loop.time()

    async def read(self, checker: StreamChecker) -> bool:
        """Now read everything into `checker`: True when the response ended normally, False
        when the server cut the connection before its end."""
        loop = asyncio.get_running_loop()
        body = Dechunker()
        # a window this small makes catching up crawl (silly-window avoidance, delayed ACKs)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        try:
            while not body.ended:
                chunk = await loop.sock_recv(self.sock, 1 << 16)
                if not chunk:
                    return False
                checker.feed(body.feed(chunk))
                if body.status not in (None, 200):
                    raise AssertionError(f"silent subscriber: HTTP {body.status}")
        except ConnectionError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()


# --- talking to the service ---------------------------------------------------------------


def client_session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit), timeout=aiohttp.ClientTimeout(total=None, sock_connect=WAIT_S)
    )


async def submit(http: aiohttp.ClientSession, base: str, tool: str) -> str:
    body = {"toolId": tool, "projectId": PROJECT}
    async with http.post(f"{base}/api/execute", json=body) as response:
        if response.status != 202:
            raise AssertionError(f"submit {tool}: HTTP {response.status}: {(await response.text())[:200]}")
        job_id: str = (await response.json())["data"]["jobId"]
        return job_id


async def get_data(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as response:
        if response.status != 200:
            raise AssertionError(f"GET {url}: HTTP {response.status}: {(await response.text())[:200]}")
        return (await response.json())["data"]


async def wait_for_job(
    http: aiohttp.ClientSession, base: str, job_id: str, condition: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        job: dict[str, Any] = await get_data(http, f"{base}/api/jobs/{job_id}")
        if condition(job):
            return job
        if loop.time() > deadline:
            raise AssertionError(f"job {job_id}: not {what} within {WAIT_S} s: {job}")
        await asyncio.sleep(0.02)


@dataclass
class Target:
    """A running service: its base URL and a probe on its process; in-process, also its count
    of open SSE sessions (of one job, or of all with None)."""

    base: str
    probe: Probe
    sessions: Callable[[str | None], int] | None = None

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.base.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    async def sessions_down_to(self, job_id: str | None, most: int, bound_s: float = SETTLE_S) -> int | None:
        """Open SSE sessions once at most `most` are left, or after `bound_s` (None: unknown)."""
        if self.sessions is None:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + bound_s
        while self.sessions(job_id) > most and loop.time() < deadline:  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.02)
        return self.sessions(job_id)


@dataclass
class Report:
    """One scenario's outcome: its checks' failures and what was measured."""

    scenario: str
    count: int
    seconds: float
    baseline: dict[str, Any]
    after: dict[str, Any]
    settle_s: float
    metrics: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def json_line(self) -> str:
        return json.dumps({"ok": self.ok} | asdict(self))


# --- (a) streams that leave mid-job -------------------------------------------------------


async def _leave_by_close(http: aiohttp.ClientSession, url: str, read_bytes: int) -> None:
    async with http.get(url) as response:
        if response.status != 200:
            raise AssertionError(f"HTTP {response.status}")
        got = b""
        while len(got) < read_bytes:
            chunk = await response.content.readany()
            if not chunk:
                raise AssertionError("the stream ended before the client left")
            got += chunk
        if not got.startswith(b"retry:"):
            raise AssertionError(f"the stream began with {got[:20]!r}")
        response.close()  # closes the connection mid-stream (FIN)


async def _leave_by_reset(host: str, port: int, path: str, read_bytes: int) -> None:
    loop = asyncio.get_running_loop()
    with socket.socket() as sock:
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        got = b""
        while len(got) < read_bytes:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise AssertionError("the stream ended before the client left")
            got += chunk
        if not got.startswith(b"HTTP/1.1 200"):
            raise AssertionError(f"the response began with {got[:20]!r}")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: RST


async def abort_round(target: Target, count: int, batch: int, read_bytes: int = 2048) -> dict[str, Any]:
    """`count` subscribers of a running job, `batch` at a time, each reading `read_bytes` and
    leaving while the job writes (even ones close, odd ones reset); an observer follows the job
    throughout and must get all of its output, once it is cancelled."""
    host, port = target.host_port
    problems: list[str] = []
    failures: dict[str, int] = {}
    async with client_session() as http:
        job_id = await submit(http, target.base, "hold")
        await wait_for_job(http, target.base, job_id, lambda j: j["outputLines"] >= HOLD_LINES, "running")
        observer = StreamChecker(hold_line)
        watching = asyncio.create_task(follow(http, target.base, job_id, observer))
        path = f"/api/stream/{job_id}"
        started = time.monotonic()
        for first in range(0, count, batch):
            leaving = [
                _leave_by_close(http, target.base + path, read_bytes)
                if i % 2 == 0
                else _leave_by_reset(host, port, path, read_bytes)
                for i in range(first, min(first + batch, count))
            ]
            async with asyncio.timeout(WAIT_S):
                results = await asyncio.gather(*leaving, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    key = repr(result)[:160]
                    failures[key] = failures.get(key, 0) + 1
        seconds = time.monotonic() - started
        # every subscriber that left is gone while the job still runs: the observer is left
        left_open = await target.sessions_down_to(job_id, 1)
        async with http.delete(f"{target.base}/api/jobs/{job_id}") as response:
            if response.status != 202:
                problems.append(f"cancel of the held job: HTTP {response.status}")
        try:
            async with asyncio.timeout(WAIT_S):
                await watching
        except (TimeoutError, AssertionError, aiohttp.ClientError) as exc:
            problems.append(f"the observer of the job did not get to its end: {exc!r}")
        job = await get_data(http, f"{target.base}/api/jobs/{job_id}")
    if failures:
        problems.append(f"{sum(failures.values())} of {count} streams failed: {failures}")
    if left_open not in (None, 1):
        problems.append(f"{left_open} SSE sessions of the job open where only the observer's should be")
    problems += [f"observer: {p}" for p in observer.problems]
    end = observer.complete or {}
    if observer.lines != job["outputLines"] or end.get("status") != "cancelled":
        problems.append(f"observer got {observer.lines} of {job['outputLines']} lines, end {end or observer.error}")
    return {
        "seconds": round(seconds, 2),
        "streams_per_s": round(count / seconds) if seconds else None,
        "failures": sum(failures.values()),
        "observer_events": observer.last_id,
        "job_lines": job["outputLines"],
        "problems": problems,
    }


async def measured(
    name: str, target: Target, count: int, warm_up: int, run_round: Callable[[int], Awaitable[dict[str, Any]]]
) -> Report:
    """Run a warm-up round, take the baseline, run the measured round, wait for the service to
    settle, and report what stayed behind."""
    await run_round(warm_up)
    baseline = await quiesce(target.probe)
    result = await run_round(count)
    after, settle_s = await settle(target.probe, baseline)
    problems = result.pop("problems") + leaks(baseline, after)
    seconds = result.pop("seconds")
    return Report(name, count, seconds, baseline.brief(), after.brief(), settle_s, result, problems)


async def scenario_streams(target: Target, count: int, batch: int, warm_up: int) -> Report:
    """(a) after a warm-up round: `count` streams leave mid-job; nothing of theirs may stay."""
    report = await measured("streams", target, count, warm_up, lambda n: abort_round(target, n, batch))
    if await target.sessions_down_to(None, 0) not in (None, 0):
        report.problems.append(f"{target.sessions and target.sessions(None)} SSE sessions still open after the round")
    return report


# --- (b) short jobs -----------------------------------------------------------------------


async def jobs_round(target: Target, count: int, concurrency: int) -> dict[str, Any]:
    """`count` short jobs, `concurrency` at a time, each submitted and followed to `complete`."""
    gate = asyncio.Semaphore(concurrency)
    failures: dict[str, int] = {}
    latencies: list[float] = []

    async def one(http: aiohttp.ClientSession) -> None:
        async with gate:
            started = time.monotonic()
            try:
                async with asyncio.timeout(WAIT_S):
                    job_id = await submit(http, target.base, "short")
                    checker = StreamChecker(lambda _: "x")
                    await follow(http, target.base, job_id, checker)
                end = checker.complete or {}
                if checker.problems or checker.lines != 1 or end.get("status") != "completed":
                    raise AssertionError(f"lines={checker.lines} end={end or checker.error} {checker.problems}")
            except (AssertionError, TimeoutError, aiohttp.ClientError, OSError) as exc:
                key = repr(exc)[:160]
                failures[key] = failures.get(key, 0) + 1
            latencies.append(time.monotonic() - started)

    started = time.monotonic()
    async with client_session(limit=concurrency) as http:
        await asyncio.gather(*(one(http) for _ in range(count)))
        seconds = time.monotonic() - started
        queue = await get_data(http, f"{target.base}/api/queue/status")
    problems = []
    if failures:
        problems.append(f"{sum(failures.values())} of {count} jobs failed: {failures}")
    if queue["running"] or queue["pending"]:
        problems.append(f"queue not empty after the round: {queue}")
    latencies.sort()
    return {
        "seconds": round(seconds, 2),
        "jobs_per_s": round(count / seconds, 1) if seconds else None,
        "latency_p50_ms": round(latencies[len(latencies) // 2] * 1000) if latencies else None,
        "latency_max_ms": round(latencies[-1] * 1000) if latencies else None,
        "failures": sum(failures.values()),
        "problems": problems,
    }


async def scenario_jobs(target: Target, count: int, concurrency: int, warm_up: int) -> Report:
    """(b) after a warm-up round: `count` short jobs; nothing of theirs may stay."""
    return await measured("jobs", target, count, warm_up, lambda n: jobs_round(target, n, concurrency))


# --- (c) a flood with a silent subscriber -------------------------------------------------


@dataclass
class FloodRun:
    job_s: float = 0.0
    #: from connecting to `complete`, for the subscriber that reads everything
    fast_s: float = 0.0
    peak_rss_mib: float = 0.0
    #: SSE sessions of the job open once the reading subscriber is gone (in-process only)
    sessions_after_fast: int | None = None
    #: what became of the silent subscriber: "caught up" or "cut off and resumed"
    silent: str | None = None
    silent_bytes_before_cut: int | None = None
    silent_events_before_cut: int | None = None
    #: from starting to read to `complete`, for the silent subscriber
    silent_s: float | None = None
    problems: list[str] = field(default_factory=list)


def _check_stream(who: str, checker: StreamChecker, count: int) -> list[str]:
    problems = [f"{who}: {p}" for p in checker.problems]
    end = checker.complete or {}
    if checker.lines != count or end.get("status") != "completed":
        problems.append(f"{who} got {checker.lines} of {count} lines, end {end.get('status') or checker.error}")
    return problems


async def flood_run(target: Target, count: int, width: int, *, silent: bool, hold_s: float = 0.0) -> FloodRun:
    """One flood job followed by a reading subscriber and, with `silent`, by one that reads
    nothing until the job is over (and `hold_s` after it connected), then everything; if the
    server cut it off meanwhile, it resumes with Last-Event-ID."""
    run = FloodRun()
    host, port = target.host_port
    expected = flood_line(width)
    async with client_session() as http, RssSampler(target.probe) as rss:
        job_id = await submit(http, target.base, "flood")
        quiet = SilentSubscriber(host, port, job_id) if silent else None
        try:
            if quiet is not None:
                await quiet.connect()
            started = time.monotonic()
            fast = StreamChecker(expected)
            async with asyncio.timeout(WAIT_S):
                await follow(http, target.base, job_id, fast)
            run.fast_s = round(time.monotonic() - started, 2)
            run.sessions_after_fast = await target.sessions_down_to(job_id, 1 if silent else 0, bound_s=5)
            job = await get_data(http, f"{target.base}/api/jobs/{job_id}")
            run.job_s = job["durationMs"] / 1000 if job["durationMs"] is not None else math.inf
            if job["status"] != "completed" or job["outputLines"] != count:
                run.problems.append(f"the job ended {job['status']} with {job['outputLines']} of {count} lines")
            run.problems += _check_stream("the reading subscriber", fast, count)
            if quiet is not None:
                loop = asyncio.get_running_loop()
                await asyncio.sleep(max(0.0, quiet.connected_at + hold_s - loop.time()))
                late = StreamChecker(expected)
                started = time.monotonic()
                async with asyncio.timeout(WAIT_S):
                    if await quiet.read(late):
                        run.silent = "caught up"
                    else:
                        run.silent = "cut off and resumed"
                        run.silent_bytes_before_cut, run.silent_events_before_cut = late.bytes, late.last_id
                        await follow(http, target.base, job_id, late, resume=True)
                run.silent_s = round(time.monotonic() - started, 2)
                run.problems += _check_stream(f"the silent subscriber ({run.silent})", late, count)
        finally:
            if quiet is not None:
                quiet.close()
    run.peak_rss_mib = round(rss.peak_mib, 1)
    return run


def _peak_problem(label: str, peak_mib: float, baseline: Snapshot) -> list[str]:
    if peak_mib <= baseline.rss_mib + FLOOD_RSS_SLACK_MIB:
        return []
    return [
        f"RSS peaked at {peak_mib:.1f} MiB during the {label}, {peak_mib - baseline.rss_mib:.1f} MiB over"
        f" its baseline {baseline.rss_mib:.1f} (bound +{FLOOD_RSS_SLACK_MIB:g})"
    ]


async def scenario_flood(
    target: Target, flood_mb: float, *, name: str, stall_s: float, expect_cut: bool, width: int = FLOOD_WIDTH
) -> Report:
    """(c) a flood with a reading subscriber only (the warm-up, and the reference speed), then
    the same with a silent subscriber beside it. With `expect_cut` the silent one stays silent
    past `stall_s`, the server's stall bound, so the server must cut it off."""
    count = flood_lines(flood_mb, width)
    before = await quiesce(target.probe)
    reference = await flood_run(target, count, width, silent=False)
    baseline = await quiesce(target.probe)
    run = await flood_run(target, count, width, silent=True, hold_s=stall_s + 2 if expect_cut else 0.0)
    after, settle_s = await settle(target.probe, baseline)
    problems = [f"reference run: {p}" for p in reference.problems] + run.problems + leaks(baseline, after)
    factor, extra = SLOWDOWN
    if run.job_s > reference.job_s * factor + extra:
        problems.append(f"the job took {run.job_s:.2f} s beside a silent subscriber, {reference.job_s:.2f} s without")
    if run.fast_s > reference.fast_s * factor + extra:
        problems.append(
            f"the reading subscriber took {run.fast_s:.2f} s beside a silent one, {reference.fast_s:.2f} s alone"
        )
    if not expect_cut and run.sessions_after_fast not in (None, 1):
        problems.append(f"{run.sessions_after_fast} sessions open after the reading one left (the silent one: 1)")
    problems += _peak_problem("reference run", reference.peak_rss_mib, before)
    problems += _peak_problem("run with a silent subscriber", run.peak_rss_mib, baseline)
    if run.silent is not None and (run.silent == "cut off and resumed") != expect_cut:
        problems.append(f"the silent subscriber was {run.silent} with stream_stall_s = {stall_s:g}")
    metrics = {
        "flood_bytes": count * width,
        "lines": count,
        "stall_s": stall_s,
        "rss_before_mib": round(before.rss_mib, 1),
        "reference": _flood_metrics(reference),
        "silent": _flood_metrics(run),
    }
    seconds = round(run.fast_s + (run.silent_s or 0.0), 2)
    return Report(name, count * width, seconds, baseline.brief(), after.brief(), settle_s, metrics, problems)


async def scenario_wide_flood(target: Target, flood_mb: float, warm_up: int, width: int = WIDE_WIDTH) -> Report:
    """(c, wide lines) after `warm_up` short jobs, a flood of `width`-byte lines with a reading
    subscriber: its `complete` event holds max_result_lines of them (15 MB with the defaults),
    and the service's RSS must still peak within +40 MiB of the baseline. A second flood then
    checks that nothing stays (against the baseline after the first: the allocator keeps some)."""
    count = flood_lines(flood_mb, width)
    await jobs_round(target, warm_up, 4)
    before = await quiesce(target.probe)
    first = await flood_run(target, count, width, silent=False)
    baseline = await quiesce(target.probe)
    second = await flood_run(target, count, width, silent=False)
    after, settle_s = await settle(target.probe, baseline)
    problems = [f"first run: {p}" for p in first.problems] + [f"second run: {p}" for p in second.problems]
    problems += _peak_problem(f"flood of {width}-byte lines", first.peak_rss_mib, before) + leaks(baseline, after)
    metrics = {
        "flood_bytes": count * width,
        "lines": count,
        "width": width,
        "rss_before_mib": round(before.rss_mib, 1),
        "first": _flood_metrics(first),
        "second": _flood_metrics(second),
    }
    seconds = round(first.fast_s + second.fast_s, 2)
    return Report(
        "flood-wide-lines", count * width, seconds, baseline.brief(), after.brief(), settle_s, metrics, problems
    )


async def scenario_replay_evicted(target: Target, flood_mb: float, evict_jobs: int, width: int = FLOOD_WIDTH) -> Report:
    """(c, later) a finished flood job whose log has left the service's cache of open logs
    (pushed out by `evict_jobs` newer jobs) is opened again, as a browser opens an old job:
    the RSS must stay within +40 MiB of the baseline, and the time the service takes to answer
    /healthz meanwhile is measured (an event loop blocked by the opening shows there)."""
    count = flood_lines(flood_mb, width)
    async with client_session() as http:
        job_id = await submit(http, target.base, "flood")
        await wait_for_job(http, target.base, job_id, lambda j: j["status"] not in ("queued", "running"), "finished")
    await jobs_round(target, evict_jobs, 8)
    baseline = await quiesce(target.probe)
    problems: list[str] = []
    async with client_session() as http, RssSampler(target.probe) as rss:
        stop = asyncio.Event()

        async def health() -> float:
            worst = 0.0
            while not stop.is_set():
                started = time.monotonic()
                await get_data(http, f"{target.base}/healthz")
                worst = max(worst, time.monotonic() - started)
                await asyncio.sleep(0.01)
            return worst

        checking = asyncio.create_task(health())
        await asyncio.sleep(0.1)
        started = time.monotonic()
        async with asyncio.timeout(WAIT_S), http.get(f"{target.base}/api/stream/{job_id}") as response:
            first = await response.content.readany()  # the beginning is enough: the log is open
        first_byte_s = time.monotonic() - started
        await asyncio.sleep(0.2)
        stop.set()
        worst_health_s = await checking
    if response.status != 200 or not first.startswith(b"retry:"):
        problems.append(f"the old job's stream answered {response.status} with {first[:40]!r}")
    problems += _peak_problem(f"opening of an old {count * width / MIB:.0f} MiB log", rss.peak_mib, baseline)
    after, settle_s = await settle(target.probe, baseline)
    problems += leaks(baseline, after)
    metrics = {
        "log_bytes": count * width,
        "evict_jobs": evict_jobs,
        "peak_rss_mib": round(rss.peak_mib, 1),
        "first_byte_ms": round(first_byte_s * 1000),
        "worst_healthz_ms": round(worst_health_s * 1000),
    }
    seconds = round(first_byte_s, 2)
    return Report(
        "replay-evicted", count * width, seconds, baseline.brief(), after.brief(), settle_s, metrics, problems
    )


def _flood_metrics(run: FloodRun) -> dict[str, Any]:
    data = asdict(run)
    del data["problems"]
    return {k: v for k, v in data.items() if v is not None}


# --- the standalone run -------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    return "".join(
        f"[{name}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in table.items()) + "\n"
        for name, table in sections.items()
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def service(
    folder: Path, *, flood_count: int, width: int = FLOOD_WIDTH, stall_s: float = 60.0, exits: list[int | None]
) -> AsyncIterator[Target]:
    """`python -m streamsvc server` on a free loopback port, with a config, a project and a
    data folder written to `folder`; stopped with SIGTERM at the end, its exit status
    appended to `exits` (None: it had to be killed)."""
    port = free_port()
    config, log = _service_files(folder, port, flood_count, width, stall_s)
    try:
        process = await asyncio.create_subprocess_exec(
            PY, "-m", "streamsvc", "server", "--config", str(config), "--log-level", "WARNING",
            stdout=asyncio.subprocess.PIPE, stderr=log,
        )  # fmt: skip
    finally:
        os.close(log)
    try:
        assert process.stdout is not None
        banner = await asyncio.wait_for(process.stdout.readline(), WAIT_S)
        if b"serving on" not in banner:
            raise AssertionError(f"the service did not start: {banner!r}; see {folder / 'service.log'}")
        yield Target(f"http://127.0.0.1:{port}", Probe(process.pid))
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            exits.append(await asyncio.wait_for(process.wait(), WAIT_S))
        except TimeoutError:
            process.kill()
            await process.wait()
            exits.append(None)


def _service_files(folder: Path, port: int, flood_count: int, width: int, stall_s: float) -> tuple[Path, int]:
    """The project, the config (its path), and the service's log (an open fd)."""
    (folder / "projects" / PROJECT).mkdir(parents=True)
    sections: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": port, "data_dir": "data", "stream_stall_s": stall_s},
        "queue": {"workers": 4},
        "projects": {"root": "projects"},
    }
    sections |= {f"tools.{tool}": table for tool, table in tool_tables(flood_count, width).items()}
    config = folder / "streamsvc.toml"
    config.write_text(toml_text(sections))
    return config, os.open(folder / "service.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


def summary(reports: list[Report]) -> str:
    rows = [f"{'scenario':17} {'ok':4} {'count':>9} {'seconds':>7} {'fds':>7} {'RSS MiB':>11} {'settle':>6}  notes"]
    for r in reports:
        fds = f"{r.baseline.get('fds', '-')}>{r.after.get('fds', '-')}"
        rss = f"{r.baseline.get('rss_mib', '-')}>{r.after.get('rss_mib', '-')}"
        notes = ""
        if r.scenario == "streams":
            notes = f"{r.metrics['streams_per_s']} streams/s, {r.metrics['failures']} failed"
        elif r.scenario == "jobs":
            notes = f"{r.metrics['jobs_per_s']} jobs/s, p50 {r.metrics['latency_p50_ms']} ms"
        elif r.scenario == "flood-wide-lines":
            peak = r.metrics["first"]["peak_rss_mib"]
            notes = f"{r.metrics['width']}-byte lines: RSS {r.metrics['rss_before_mib']} before, peak {peak}"
        elif r.scenario == "replay-evicted":
            notes = f"peak RSS {r.metrics['peak_rss_mib']}; /healthz waited up to {r.metrics['worst_healthz_ms']} ms"
        elif r.scenario.startswith("flood"):
            silent, reference = r.metrics["silent"], r.metrics["reference"]
            notes = (
                f"job {reference['job_s']:.2f} s alone, {silent['job_s']:.2f} s beside a silent reader;"
                f" peak RSS {silent['peak_rss_mib']}; the silent one {silent.get('silent')}"
            )
        rows.append(
            f"{r.scenario:17} {'ok' if r.ok else 'FAIL':4} {r.count:>9} {r.seconds:>7.2f} {fds:>7} {rss:>11}"
            f" {r.settle_s:>6.2f}  {notes}"
        )
        rows += [f"    FAIL: {problem}" for problem in r.problems]
    return "\n".join(rows)


async def run(args: argparse.Namespace) -> list[Report]:
    reports: list[Report] = []
    count = flood_lines(args.flood_mb, args.flood_width)
    exits: list[int | None] = []

    def emit(report: Report) -> None:
        reports.append(report)
        print(report.json_line(), flush=True)

    with tempfile.TemporaryDirectory(prefix="streamsvc-load-") as tmp:
        async with service(
            Path(tmp, "a"), flood_count=count, width=args.flood_width, stall_s=args.stall_s_default, exits=exits
        ) as target:
            if args.streams:
                emit(await scenario_streams(target, args.streams, args.batch, min(args.batch, args.streams)))
            if args.jobs:
                emit(await scenario_jobs(target, args.jobs, args.concurrency, min(4 * args.concurrency, args.jobs)))
            if args.flood_mb:
                stall_s = args.stall_s_default
                flood = scenario_flood(
                    target,
                    args.flood_mb,
                    name="flood-catch-up",
                    stall_s=stall_s,
                    expect_cut=False,
                    width=args.flood_width,
                )
                emit(await flood)
                if args.replay:
                    emit(await scenario_replay_evicted(target, args.flood_mb, args.replay, args.flood_width))
        if args.flood_mb:
            async with service(
                Path(tmp, "b"), flood_count=count, width=args.flood_width, stall_s=args.stall_s, exits=exits
            ) as target:
                flood = scenario_flood(
                    target,
                    args.flood_mb,
                    name="flood-cut-off",
                    stall_s=args.stall_s,
                    expect_cut=True,
                    width=args.flood_width,
                )
                emit(await flood)
        if args.wide_mb:
            wide_count = flood_lines(args.wide_mb, WIDE_WIDTH)
            async with service(Path(tmp, "c"), flood_count=wide_count, width=WIDE_WIDTH, exits=exits) as target:
                emit(await scenario_wide_flood(target, args.wide_mb, warm_up=2 * args.concurrency))
    stops = [f"service {i + 1} exited with {code} on SIGTERM" for i, code in enumerate(exits) if code != 0]
    if stops:
        emit(Report("shutdown", len(exits), 0.0, {}, {}, 0.0, {"exits": exits}, stops))
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=1000, help="(a) subscribers that leave mid-job (0: skip)")
    parser.add_argument("--batch", type=int, default=100, help="(a) of them at once")
    parser.add_argument("--jobs", type=int, default=1000, help="(b) short jobs (0: skip)")
    parser.add_argument("--concurrency", type=int, default=16, help="(b) short jobs at once")
    parser.add_argument("--flood-mb", type=float, default=50, help="(c) MiB the flood job writes (0: skip)")
    parser.add_argument("--flood-width", type=int, default=FLOOD_WIDTH, help="(c) bytes per flood line")
    parser.add_argument("--wide-mb", type=float, default=15, help=f"(c) a flood of {WIDE_WIDTH}-byte lines (0: skip)")
    parser.add_argument(
        "--replay", type=int, default=70, help="(c) jobs run before an old flood job is opened again (0: skip)"
    )
    parser.add_argument("--stall-s", type=float, default=2.0, help="(c) stream_stall_s of the cut-off variant")
    parser.add_argument("--stall-s-default", type=float, default=60.0, help="stream_stall_s of the other runs")
    parser.add_argument("--time-limit", type=float, default=300.0, help="give up after this many seconds")
    args = parser.parse_args(argv)
    if (
        min(args.streams, args.jobs, args.flood_mb, args.wide_mb, args.replay) < 0
        or min(args.batch, args.concurrency) < 1
    ):
        parser.error("counts must not be negative, --batch and --concurrency at least 1")
    if args.flood_width < 16:
        parser.error("--flood-width must be at least 16")

    started = time.monotonic()
    try:
        reports = asyncio.run(asyncio.wait_for(run(args), args.time_limit))
    except TimeoutError:
        print(f"load: FAILED: the run did not finish within {args.time_limit:g} s", file=sys.stderr)
        return 1
    print()
    print(summary(reports))
    failed = [r.scenario for r in reports if not r.ok]
    print(f"load: {'ok' if not failed else 'FAILED: ' + ', '.join(failed)} in {time.monotonic() - started:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
