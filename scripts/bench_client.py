"""The client side of scripts/bench.py: SSE subscribers and job submitters, in worker processes.

One Python process cannot read a million events a second, so the bench spreads its clients
over a few processes (`ClientProcesses`), each with its own event loop and aiohttp session.
Every worker follows one protocol over a pipe: it sets up (connects its streams), says
`ready`, waits for `go`, runs, and sends back its results with the CPU time it used, so a
report can show whether the client or the service was the busy one.

A stream is parsed in bulk, never event by event: each received chunk, cut at its last
newline, goes through a few compiled regular expressions (C code) that pull out the numbers
the bench tool put at the start of each line (`scripts/bench_tool.c`). This reads both the
streamsvc frames (`id: 7\\nevent: output\\ndata: {"line":"…",…}`) and the Node seed's
(`event:output\\nid:…\\ndata:{"line":"…",…}`), since both put the line first in the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import re
import resource
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

#: the bound on any one step of a worker (connecting, waiting for go, a whole run)
STEP_BOUND_S = 300.0
#: streams connect this many at a time (the listen backlog of a server is finite)
CONNECT_BATCH = 100
#: a job's stream on which nothing arrives for this long counts as lost (the Node seed drops
#: the `complete` of a job that ended before its subscriber connected, and never ends it)
LOST_IDLE_S = 5.0
#: once some stream has seen its job complete, a stream that has not had a line yet is given
#: up after this long without a byte (the Node seed serves one subscriber per job: the others
#: never get one), and one that has had lines after LOST_IDLE_S (a busy service lags)
ENDED_IDLE_S = 1.0
READ_BUFSIZE = 1 << 20

_COMPLETE = re.compile(rb"event: ?complete\n")
_LINE = b'"line":"'


def _seq_pattern(stamped: bool) -> re.Pattern[bytes]:
    return re.compile(rb'"line":"\d{19} (\d{9}) ' if stamped else rb'"line":"(\d{9})')


_STAMP = re.compile(rb'"line":"(\d{19}) ')


@dataclass(frozen=True)
class StreamPlan:
    """One subscriber: where to connect and what it must receive."""

    url: str
    #: output lines the job prints (numbered 0..lines-1)
    lines: int
    #: the lines carry their print time (bench_tool: lines of 32 bytes or more)
    stamped: bool = True
    #: the latencies of the lines of every n-th chunk received are kept (0: none); as likely
    #: for every line as sampling lines, and far cheaper than parsing every chunk's times
    sample_every: int = 1
    #: every line number is compared; else the count and each chunk's first and last number
    full_check: bool = True


@dataclass
class StreamResult:
    lines: int = 0
    in_order: bool = True
    complete: bool = False
    #: wall-clock ns of the chunk that held the last output line (0: none came)
    last_line_ns: int = 0
    #: receive time minus print time of the sampled lines, ns (array('q') bytes)
    latencies: bytes = b""
    error: str | None = None


class LineCheck:
    """Checks one stream as it arrives: output lines 0, 1, 2, ... in order, each once."""

    def __init__(self, plan: StreamPlan) -> None:
        self.plan = plan
        self.result = StreamResult()
        self._seq = _seq_pattern(plan.stamped)
        self._sampling = plan.sample_every if plan.stamped else 0
        self._chunks = 0
        self._expected = b"".join(b"%09d" % seq for seq in range(plan.lines)) if plan.full_check else b""
        self._latencies = array("q")
        self._tail = bytearray()

    def feed(self, chunk: bytes, received_ns: int) -> None:
        cut = chunk.rfind(b"\n") + 1
        if not cut:
            self._tail += chunk  # within one long line (a large `complete`): nothing to parse yet
            return
        if self._tail:
            region = bytes(self._tail) + chunk[:cut]
            self._tail.clear()
        else:
            region = chunk if cut == len(chunk) else chunk[:cut]  # (the usual case: no copy)
        if cut < len(chunk):
            self._tail += chunk[cut:]
        self._check_lines(region, received_ns)
        if not self.result.complete and _COMPLETE.search(region):
            self.result.complete = True

    def _check_lines(self, region: bytes, received_ns: int) -> None:
        result = self.result
        if self.plan.full_check:
            numbers = self._seq.findall(region)
            count = len(numbers)
            if count and b"".join(numbers) != self._expected[9 * result.lines : 9 * (result.lines + count)]:
                result.in_order = False
        else:
            count = region.count(_LINE)
            if count:
                first, last = self._seq.search(region), self._seq.findall(region[region.rfind(_LINE) :])
                if (
                    first is None
                    or not last
                    or (int(first[1]), int(last[0]))
                    != (
                        result.lines,
                        result.lines + count - 1,
                    )
                ):
                    result.in_order = False
        if count:
            result.lines += count
            result.last_line_ns = received_ns
        if count and self._sampling:
            if self._chunks % self._sampling == 0:  # the 1st, the n+1-th, ...
                self._latencies.extend(received_ns - int(stamp) for stamp in _STAMP.findall(region))
            self._chunks += 1

    def finish(self) -> StreamResult:
        self.result.latencies = self._latencies.tobytes()
        if self.result.lines != self.plan.lines:
            self.result.in_order = False
        return self.result


# --- workers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamsWork:
    """A worker's share of subscribers."""

    plans: tuple[StreamPlan, ...]


@dataclass(frozen=True)
class JobsWork:
    """A worker's share of the jobrate scenario: `jobs` jobs, `clients` at a time, each
    submitted and followed over SSE to its `complete`."""

    base: str
    tool: str
    project: str
    jobs: int
    clients: int


@dataclass
class WorkerReport:
    results: list[Any] = field(default_factory=list)
    cpu_s: float = 0.0
    errors: list[str] = field(default_factory=list)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, connect=30)
    return aiohttp.ClientSession(connector=connector, timeout=timeout)


def worker_main(conn: multiprocessing.connection.Connection, work: StreamsWork | JobsWork, ended: Any) -> None:
    """A worker process's entry point (`ended`: a multiprocessing.Event shared by the workers)."""
    try:
        report = asyncio.run(_streams(conn, work, ended) if isinstance(work, StreamsWork) else _jobs(conn, work))
    except Exception as exc:
        report = WorkerReport(errors=[f"worker failed: {exc!r}"])
    conn.send(("results", report))
    conn.close()


async def _wait_go(conn: multiprocessing.connection.Connection) -> None:
    ready = await asyncio.to_thread(conn.poll, STEP_BOUND_S)
    if not ready or conn.recv() != "go":
        raise TimeoutError("no go from the bench")


async def _streams(
    conn: multiprocessing.connection.Connection, work: StreamsWork, ended: multiprocessing.synchronize.Event
) -> WorkerReport:
    report = WorkerReport()
    async with _session() as session:
        followers = [_Follower(plan, ended) for plan in work.plans]
        for start in range(0, len(followers), CONNECT_BATCH):
            await asyncio.gather(*(f.connect(session) for f in followers[start : start + CONNECT_BATCH]))
        report.errors += [f.check.result.error for f in followers if f.check.result.error]
        conn.send(("ready", len(followers) - len(report.errors)))
        await _wait_go(conn)
        cpu = _cpu_s()
        tasks = [asyncio.create_task(f.read()) for f in followers]
        watchdog = asyncio.create_task(_watch(followers, tasks, ended))
        await asyncio.wait(tasks, timeout=STEP_BOUND_S)
        watchdog.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(watchdog, *tasks, return_exceptions=True)
        report.cpu_s = _cpu_s() - cpu
        report.results = [f.close() for f in followers]
    return report


async def _watch(followers: Sequence[_Follower], tasks: Sequence[asyncio.Task[None]], ended: Any) -> None:
    """Give up the streams that stopped receiving after some stream's job ended."""
    while True:
        await asyncio.sleep(0.1)
        if not ended.is_set():
            continue
        now = time.monotonic()
        for follower, task in zip(followers, tasks, strict=True):
            allowed = LOST_IDLE_S if follower.check.result.lines else ENDED_IDLE_S
            if not task.done() and now - follower.last_rx > allowed:
                task.cancel()


class _Follower:
    """One SSE subscriber: connects (headers received), then reads until its job's `complete`."""

    def __init__(self, plan: StreamPlan, ended: multiprocessing.synchronize.Event) -> None:
        self.check = LineCheck(plan)
        self.ended = ended
        self.last_rx = time.monotonic()
        self._response: aiohttp.ClientResponse | None = None

    async def connect(self, session: aiohttp.ClientSession) -> None:
        try:
            response = await session.get(self.check.plan.url, read_bufsize=READ_BUFSIZE)
        except (aiohttp.ClientError, OSError) as exc:
            self.check.result.error = f"connect: {exc!r}"
            return
        if response.status != 200:
            self.check.result.error = f"HTTP {response.status}"
            response.release()
            return
        self._response = response

    async def read(self) -> None:
        if self._response is None:
            return
        content = self._response.content
        self.last_rx = time.monotonic()
        while chunk := await content.readany():
            self.last_rx = time.monotonic()
            self.check.feed(chunk, time.time_ns())
            if self.check.result.complete:
                self.ended.set()
                return

    def close(self) -> StreamResult:
        if self._response is not None:
            self._response.close()
        return self.check.finish()


async def _jobs(conn: multiprocessing.connection.Connection, work: JobsWork) -> WorkerReport:
    """Each client in turn submits a job and follows it; a result is (submit ns, complete ns
    or 0 when lost)."""
    report = WorkerReport()
    left = iter(range(work.jobs))
    async with _session() as session:
        conn.send(("ready", work.clients))
        await _wait_go(conn)
        cpu = _cpu_s()

        async def client() -> None:
            for _ in left:
                report.results.append(await _submit_and_follow(session, work, report.errors))

        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(work.clients))), STEP_BOUND_S)
        report.cpu_s = _cpu_s() - cpu
    return report


async def _submit_and_follow(session: aiohttp.ClientSession, work: JobsWork, errors: list[str]) -> tuple[int, int]:
    submitted = time.time_ns()
    try:
        body = {"toolId": work.tool, "projectId": work.project}
        async with session.post(f"{work.base}/api/execute", json=body) as response:
            job_id = (await response.json())["data"]["jobId"]
        timeout = aiohttp.ClientTimeout(sock_read=LOST_IDLE_S)
        async with session.get(f"{work.base}/api/stream/{job_id}", timeout=timeout) as response:
            tail = b""  # the end of the previous chunk: `event: complete` may straddle two
            while chunk := await response.content.readany():
                if _COMPLETE.search(tail + chunk[:32]) or _COMPLETE.search(chunk):
                    return submitted, time.time_ns()
                tail = chunk[-32:]
    except (TimeoutError, aiohttp.ServerTimeoutError):
        pass  # lost: the stream went quiet without a `complete`
    except (aiohttp.ClientError, OSError, KeyError, ValueError) as exc:
        if len(errors) < 10:
            errors.append(repr(exc))
    return submitted, 0


# --- the bench's side ---------------------------------------------------------------------


class ClientProcesses:
    """Worker processes running `work` (one item each): `ready()`, then `go()`, then `results()`."""

    def __init__(self, works: Sequence[StreamsWork | JobsWork]) -> None:
        self._context = multiprocessing.get_context("spawn")
        self.ended = self._context.Event()
        self._pipes: list[multiprocessing.connection.Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._works = works
        #: the reports of workers that ended before they were ready
        self._early: dict[int, WorkerReport] = {}

    async def __aenter__(self) -> ClientProcesses:
        for work in self._works:
            ours, theirs = self._context.Pipe()
            process = self._context.Process(target=worker_main, args=(theirs, work, self.ended), daemon=True)
            process.start()
            theirs.close()
            self._pipes.append(ours)
            self._processes.append(process)
        return self

    async def __aexit__(self, *_: object) -> None:
        for process in self._processes:
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join, 10)
        for pipe in self._pipes:
            pipe.close()

    async def ready(self) -> tuple[int, list[str]]:
        """How many clients are set up (streams connected), and the problems of the others."""
        count, problems = 0, []
        for index, pipe in enumerate(self._pipes):
            kind, value = await self._receive(pipe)
            if kind == "ready":
                count += value
            else:
                self._early[index] = value
                problems += value.errors
        return count, problems

    def go(self) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                pipe.send("go")

    async def results(self) -> list[WorkerReport]:
        reports = []
        for index, pipe in enumerate(self._pipes):
            if index in self._early:
                reports.append(self._early[index])
                continue
            kind, value = await self._receive(pipe)
            reports.append(value if kind == "results" else WorkerReport(errors=[f"unexpected {kind}"]))
        return reports

    @staticmethod
    async def _receive(pipe: multiprocessing.connection.Connection) -> tuple[str, Any]:
        if not await asyncio.to_thread(pipe.poll, STEP_BOUND_S):
            raise TimeoutError("a client process did not answer")
        try:
            message: tuple[str, Any] = pipe.recv()
        except EOFError:
            return "results", WorkerReport(errors=["a client process died"])
        return message


def spread(plans: Sequence[StreamPlan], processes: int) -> list[StreamsWork]:
    """`plans` dealt round-robin over at most `processes` workers."""
    count = max(1, min(processes, len(plans)))
    return [StreamsWork(tuple(plans[i::count])) for i in range(count)]


def latencies_ms(results: Sequence[StreamResult]) -> list[float]:
    samples = array("q")
    for result in results:
        samples.frombytes(result.latencies)
    return sorted(ns / 1e6 for ns in samples)


def percentile(ordered: Sequence[float], fraction: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]
