"""The client side of scripts/bench.py: SSE subscribers and job submitters, in worker processes.

One Python process cannot read a million events a second, so the bench spreads its clients
over a few processes (`ClientProcesses`). A stream worker reads its streams on bare sockets
from one epoll loop (`_Stream`: the client shares the service's cores, and through aiohttp
and asyncio it cost as much CPU per event as the service); a jobrate worker submits and
follows jobs with bare HTTP/1.1 on asyncio streams (`_submit_and_follow_on`). Every worker
follows one protocol over a pipe: it sets up (connects its streams), says `ready`, waits for
`go`, runs, and sends back its results with the CPU time it used, so a report can show
whether the client or the service was the busy one.

A stream is parsed in bulk, never event by event: each received chunk, cut at its last
newline, goes through a few compiled regular expressions (C code) that pull out the numbers
the bench tool put at the start of each line (`scripts/bench_tool.c`). This reads both the
streamsvc frames (`id: 7\\nevent: output\\ndata: {"line":"…",…}`) and the Node seed's
(`event:output\\nid:…\\ndata:{"line":"…",…}`), since both put the line first in the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import re
import resource
import select
import socket
import time
import urllib.parse
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

#: the bound on any one step of a worker (connecting, waiting for go, a whole run)
STEP_BOUND_S = 300.0
#: a job's stream on which nothing arrives for this long counts as lost (the Node seed drops
#: the `complete` of a job that ended before its subscriber connected, and never ends it)
LOST_IDLE_S = 5.0
#: once some stream has seen its job complete, a stream that has not had a line yet is given
#: up after this long without a byte (the Node seed serves one subscriber per job: the others
#: never get one), and one that has had lines after LOST_IDLE_S (a busy service lags)
ENDED_IDLE_S = 1.0
#: the bound on connecting a stream, and on the size of a response head
CONNECT_BOUND_S = 30.0
MAX_HEAD_BYTES = 64 * 1024
#: the most one read of a stream takes
RECV_BYTES = 256 * 1024
#: every read lands here first: a fresh 256 KiB bytes per read, shrunk to what arrived, is
#: mapped and unmapped by glibc each time (13.5 us and 2 page faults a read, against 1.3 us)
_RECV_BUFFER = bytearray(RECV_BYTES)
_RECV_VIEW = memoryview(_RECV_BUFFER)
#: how often the streams' loop looks for streams to give up
WATCH_EVERY_S = 0.1

_COMPLETE = re.compile(rb"event: ?complete\n")
#: a job that ran to success: streamsvc says "completed", the Node seed "succeeded"
_COMPLETED = re.compile(rb'"status": ?"(?:completed|succeeded)"')
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)
_CLOSES = re.compile(rb"\r\nconnection: *close", re.IGNORECASE)
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


def worker_main(conn: multiprocessing.connection.Connection, work: StreamsWork | JobsWork, ended: Any) -> None:
    """A worker process's entry point (`ended`: a multiprocessing.Event shared by the workers)."""
    try:
        report = _streams(conn, work, ended) if isinstance(work, StreamsWork) else asyncio.run(_jobs(conn, work))
    except Exception as exc:
        report = WorkerReport(errors=[f"worker failed: {exc!r}"])
    conn.send(("results", report))
    conn.close()


async def _wait_go(conn: multiprocessing.connection.Connection) -> None:
    ready = await asyncio.to_thread(conn.poll, STEP_BOUND_S)
    if not ready or conn.recv() != "go":
        raise TimeoutError("no go from the bench")


def _streams(
    conn: multiprocessing.connection.Connection, work: StreamsWork, ended: multiprocessing.synchronize.Event
) -> WorkerReport:
    """Connect every stream, say ready, wait for go, then read them all from one epoll loop
    until each has its `complete`, ends, or is given up (see LOST_IDLE_S)."""
    report = WorkerReport()
    streams = [_Stream(plan) for plan in work.plans]
    for stream in streams:
        stream.connect()
    report.errors += [s.check.result.error for s in streams if s.check.result.error]
    conn.send(("ready", len(streams) - len(report.errors)))
    if not conn.poll(STEP_BOUND_S) or conn.recv() != "go":
        raise TimeoutError("no go from the bench")
    cpu = _cpu_s()
    with select.epoll() as poller:
        live = {}
        for stream in streams:
            if stream.sock is not None:
                stream.last_rx_ns = time.time_ns()
                live[stream.sock.fileno()] = stream
                poller.register(stream.sock, select.EPOLLIN)
        deadline = time.monotonic() + STEP_BOUND_S
        watch_at = time.monotonic() + WATCH_EVERY_S
        while live and watch_at < deadline:
            for fd, _ in poller.poll(WATCH_EVERY_S):
                if not live[fd].receive():
                    stream = live.pop(fd)
                    poller.unregister(fd)
                    if stream.check.result.complete:
                        ended.set()
            if time.monotonic() >= watch_at:
                watch_at += WATCH_EVERY_S
                if ended.is_set():
                    for fd, stream in list(live.items()):
                        if stream.idle_too_long(time.time_ns()):
                            poller.unregister(fd)
                            del live[fd]
    report.cpu_s = _cpu_s() - cpu
    report.results = [stream.close() for stream in streams]
    return report


class _Stream:
    """One SSE subscriber on a bare socket: connects (response head received), then is read
    until its job's `complete`. The bench speaks HTTP/1.1 itself, from a plain epoll loop,
    because the client shares the service's two cores: through aiohttp's client and asyncio
    it cost as much CPU per event as the service under test (13 µs a one-line read). The
    body, chunked or not, is decoded in bulk (a read's chunks joined, never walked byte by
    byte) and checked as it arrives."""

    def __init__(self, plan: StreamPlan) -> None:
        self.check = LineCheck(plan)
        self.sock: socket.socket | None = None
        self.last_rx_ns = 0
        self._chunks: _Dechunker | None = None  # the body's decoder when it is chunked
        self._ended = False

    def connect(self) -> None:
        url = urllib.parse.urlsplit(self.check.plan.url)
        target = url.path + (f"?{url.query}" if url.query else "")
        try:
            sock = socket.create_connection((url.hostname, url.port), timeout=CONNECT_BOUND_S)
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {url.netloc}\r\nAccept: text/event-stream\r\n\r\n".encode())
            status, rest = self._read_head(sock)
        except (OSError, ValueError) as exc:
            self.check.result.error = f"connect: {exc!r}"
            return
        if status != 200:
            self.check.result.error = f"HTTP {status}"
            sock.close()
            return
        sock.settimeout(None)  # read only when epoll says it is readable
        self.sock = sock
        if rest:
            self._feed(rest, time.time_ns())

    def receive(self) -> bool:
        """Read what has arrived; False once the stream has ended (complete, closed, failed)."""
        assert self.sock is not None
        try:
            size = self.sock.recv_into(_RECV_BUFFER)
        except OSError:
            size = 0
        if not size:
            self._ended = True
        else:
            self.last_rx_ns = received_ns = time.time_ns()
            self._feed(_RECV_VIEW[:size].tobytes(), received_ns)
        ended = self._ended or (self._chunks is not None and self._chunks.ended)
        return not (ended or self.check.result.complete)

    def idle_too_long(self, now_ns: int) -> bool:
        """Once some stream's job has ended: has this one been silent too long to wait on?"""
        allowed = LOST_IDLE_S if self.check.result.lines else ENDED_IDLE_S
        return now_ns - self.last_rx_ns > allowed * 1e9

    def close(self) -> StreamResult:
        if self.sock is not None:
            self.sock.close()
        return self.check.finish()

    def _read_head(self, sock: socket.socket) -> tuple[int, bytes]:
        sock.settimeout(STEP_BOUND_S)
        head = b""
        while (end := head.find(b"\r\n\r\n")) < 0:
            if len(head) > MAX_HEAD_BYTES:
                raise ValueError("a response head without an end")
            data = sock.recv(RECV_BYTES)
            if not data:
                raise ConnectionResetError("closed before the response head")
            head += data
        status, self._chunks = _parse_head(head[:end])
        return status, head[end + 4 :]

    def _feed(self, data: bytes, received_ns: int) -> None:
        body = self._chunks.feed(data) if self._chunks is not None else data
        if body:
            self.check.feed(body, received_ns)


def _parse_head(head: bytes) -> tuple[int, _Dechunker | None]:
    """A response head's status, and a decoder for its body when that is chunked."""
    lowered = head.lower()
    chunked = b"\r\ntransfer-encoding: chunked" in lowered
    return int(lowered.split(b" ", 2)[1]), _Dechunker() if chunked else None


class _Dechunker:
    """The data of a chunked HTTP/1.1 body, fed as it arrives (chunk framing cut out)."""

    def __init__(self) -> None:
        self._pending = b""  # an unfinished chunk-size line
        self._left = 0  # bytes still to come of the current chunk's data
        self._skip = 0  # bytes still to skip of the CRLF after a chunk's data
        #: the last chunk has arrived: the body has ended
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        """The data of the chunks in `data`, keeping what is unfinished for the next call."""
        if self._pending:
            data, self._pending = self._pending + data, b""
        parts = []
        pos, size = 0, len(data)
        while pos < size:
            if self._left:
                take = min(self._left, size - pos)
                parts.append(data[pos : pos + take])
                pos += take
                self._left -= take
            elif self._skip:
                step = min(self._skip, size - pos)
                pos += step
                self._skip -= step
            else:
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    self._pending = data[pos:]
                    break
                self._left = int(data[pos:line_end].partition(b";")[0], 16)
                self._skip = 2
                pos = line_end + 2
                if not self._left:  # the last chunk: the body has ended
                    self.ended = True
                    break
        return parts[0] if len(parts) == 1 else b"".join(parts)


async def _jobs(conn: multiprocessing.connection.Connection, work: JobsWork) -> WorkerReport:
    """Each client in turn submits a job and follows it; a result is (submit ns, complete ns
    or 0 when lost)."""
    report = WorkerReport()
    left = iter(range(work.jobs))
    conn.send(("ready", work.clients))
    await _wait_go(conn)
    cpu = _cpu_s()

    async def client() -> None:
        for _ in left:
            report.results.append(await _submit_and_follow(work, report.errors))

    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(work.clients))), STEP_BOUND_S)
    report.cpu_s = _cpu_s() - cpu
    return report


async def _submit_and_follow(work: JobsWork, errors: list[str]) -> tuple[int, int]:
    submitted = time.time_ns()
    try:
        completed, status_ok = await _submit_and_follow_on(work)
        if completed and not status_ok and len(errors) < 10:
            errors.append("a job's `complete` says it did not succeed")
        return submitted, completed
    except (OSError, ValueError, KeyError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        if len(errors) < 10:
            errors.append(repr(exc))
    return submitted, 0


async def _submit_and_follow_on(work: JobsWork) -> tuple[int, bool]:
    """Submit a job, then read its stream on the same connection (as a pooling client does)
    until its `complete`, or until it is quiet for LOST_IDLE_S: when the `complete` came (0:
    never), and whether it says the job succeeded. Bare HTTP/1.1 on asyncio streams, as
    `_Stream` reads streams: aiohttp's client cost 0.7-1.0 ms of CPU a job here."""
    url = urllib.parse.urlsplit(work.base)
    body = json.dumps({"toolId": work.tool, "projectId": work.project}).encode()
    submit = (
        f"POST /api/execute HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(url.hostname, url.port), CONNECT_BOUND_S)
    except TimeoutError as exc:
        raise ConnectionError("cannot connect") from exc
    try:
        writer.write(submit)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_BOUND_S)
        length = _CONTENT_LENGTH.search(head)
        if length is None or _CLOSES.search(head):
            raise ValueError(f"a submit's answer with no length or no keep-alive: {head[:200]!r}")
        job_id = json.loads(await reader.readexactly(int(length[1])))["data"]["jobId"]
        writer.write(
            f"GET /api/stream/{job_id} HTTP/1.1\r\nHost: {url.netloc}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), LOST_IDLE_S)
        status, chunks = _parse_head(head[:-4])
        if status != 200:
            raise ValueError(f"the stream answered {status}")
        seen = b""  # unparsed: the last bytes before `event: complete`, then its frame so far
        completed = 0
        while data := await asyncio.wait_for(reader.read(RECV_BYTES), LOST_IDLE_S):
            seen += chunks.feed(data) if chunks is not None else data
            if not completed and (found := _COMPLETE.search(seen)):
                completed, seen = time.time_ns(), seen[found.start() :]
            if completed and (b"\n\n" in seen or len(seen) > MAX_HEAD_BYTES):
                break
            if not completed:
                seen = seen[-32:]  # `event: complete` may straddle two reads
    except TimeoutError:
        return 0, False  # lost: the stream went quiet without a `complete`
    finally:
        writer.close()
    return completed, bool(completed and _COMPLETED.search(seen.partition(b"\n\n")[0]))


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
