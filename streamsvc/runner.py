"""One job's subprocess: start it confined, split its output into lines, end it for sure."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from attrs import define, frozen

from .config import Limits
from .models import JobStatus
from .sandbox import Jail, Sandbox

#: a line counts at least this much against max_output_bytes, so that a flood of empty
#: lines (each an event of ~90 bytes in the log) cannot grow a log far past the cap
MIN_LINE_CHARGE = 16
#: how long a killed process tree may take to be gone before we stop waiting for it
REAP_BOUND_S = 10.0
#: how often a stopped job's group is looked at during its grace, once the tool itself has exited
GROUP_POLL_S = 0.02
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"
#: the most asked of a tool's pipe in one read: what a Linux pipe holds. asyncio asks for
#: 256 KiB, a buffer that glibc may then get with mmap, fill with one line, shrink with mremap
#: and free with munmap, on every read (cpython gh-121313): 14.7 µs to read a line here, against
#: 1.1 (docs/PERFORMANCE.md, the morning pass of 2026-12-06)
PIPE_READ_BYTES = 64 * 1024

#: takes a batch of output lines of one stream ("stdout" or "stderr"), in arrival order
Sink = Callable[[str, list[str]], None]


@frozen
class RunSpec:
    argv: tuple[str, ...]
    cwd: Path
    env: dict[str, str]
    limits: Limits

    @staticmethod
    def clean_env(extra: dict[str, str]) -> dict[str, str]:
        """PATH and LANG, then what the tool's config names: nothing of the server's.
        The run adds HOME: a fresh folder per job."""
        return {"PATH": BASE_PATH, "LANG": "C.UTF-8"} | dict(extra)


@frozen
class Outcome:
    status: JobStatus
    exit_code: int | None = None
    signal: str | None = None
    error: str | None = None
    truncated: bool = False


@define
class _Stop:
    status: JobStatus
    error: str


class Run:
    """Runs one tool process. `stop()` ends it early (cancel, shutdown); `execute()` returns
    only when the process and every descendant it left are gone and both pipes are drained."""

    def __init__(self, spec: RunSpec, sandbox: Sandbox, sink: Sink) -> None:
        self.spec = spec
        self.sandbox = sandbox
        self.sink = sink
        self.output_bytes = 0
        #: what counts against max_output_bytes: a short line costs MIN_LINE_CHARGE
        self._charged = 0
        self._stop: _Stop | None = None
        self._stopped = asyncio.Event()
        self._exited = False
        self._truncated = False

    def stop(self, status: JobStatus, error: str) -> None:
        """Ask the run to end with `status` (the first reason given wins). Once the tool
        has exited, only the output cap can still change how its job ended."""
        if self._exited and status is not JobStatus.FAILED:
            return
        if self._stop is None:
            self._stop = _Stop(status, error)
            self._stopped.set()

    async def execute(self) -> Outcome:
        if not self.spec.cwd.is_dir():
            return Outcome(JobStatus.FAILED, error=f"the working folder {self.spec.cwd.name!r} does not exist")
        jail = self.sandbox.jail(self.spec.limits)
        try:
            home = self.sandbox.homes.take()
        except OSError as exc:
            await _empty(self.sandbox, jail)
            return Outcome(JobStatus.FAILED, error=f"cannot make the job's home folder: {exc.strerror}")
        try:
            return await self._spawn_and_follow(jail, home)
        finally:
            # a home is handed on only when a pids group proved every process of the job gone
            gone = await _empty(self.sandbox, jail) and "pids" in jail.groups
            await self.sandbox.homes.give_back(home, reusable=gone)

    async def _spawn_and_follow(self, jail: Jail, home: Path) -> Outcome:
        try:
            child = jail.start(
                self.spec.argv,
                self.spec.cwd,
                self.spec.env | {"HOME": str(home)},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            return Outcome(JobStatus.FAILED, error=f"cannot start {self.spec.argv[0]!r}: {reason}")
        async with _exit_of(child) as exited, _Pipes(child, self._emit, self.spec.limits.max_line_bytes) as pipes:
            try:
                await self._supervise(child, exited)
                self._exited = True
            finally:
                await self._drain(child.pid, jail, pipes)
        return self._outcome(child.returncode, jail)

    async def _supervise(self, child: subprocess.Popen[bytes], exited: asyncio.Future[None]) -> None:
        """Wait for the exit, a stop or the timeout; on the last two, TERM the group, and KILL
        what is left of it after the grace (the tool's children get all of it too)."""
        pid = child.pid
        stopped = asyncio.ensure_future(self._stopped.wait())
        either: set[asyncio.Future[Any]] = {exited, stopped}
        try:
            await asyncio.wait(either, timeout=self.spec.limits.timeout_s, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():  # by itself: a stop asked meanwhile, never acted on, changes nothing
                if self._stop is not None and self._stop.status is not JobStatus.FAILED:
                    self._stop = None
                return
            self.stop(JobStatus.TIMEOUT, f"timed out after {self.spec.limits.timeout_s:g} s")
            _signal_group(pid, signal.SIGTERM)
            deadline = asyncio.get_running_loop().time() + self.spec.limits.kill_grace_s
            await asyncio.wait({exited}, timeout=self.spec.limits.kill_grace_s)
            if exited.done():
                child.wait()  # reaped (it has exited), so that only the rest of its group counts
                await _group_gone(pid, deadline)
        finally:
            stopped.cancel()
            if not exited.done():
                _signal_group(pid, signal.SIGKILL)
                await asyncio.wait({exited}, timeout=REAP_BOUND_S)

    async def _drain(self, pid: int, jail: Jail, pipes: _Pipes) -> None:
        """Kill whatever the tool left running (no orphan survives its job), drain the pipes."""
        _signal_group(pid, signal.SIGKILL)
        jail.kill_all()
        await pipes.drained(self.spec.limits.kill_grace_s + 1)

    def _outcome(self, returncode: int | None, jail: Jail) -> Outcome:
        exit_code = returncode if returncode is not None and returncode >= 0 else None
        sig = signal.Signals(-returncode).name if returncode is not None and returncode < 0 else None
        if self._stop is not None:
            status, error = self._stop.status, self._stop.error
        elif returncode == 0:
            status, error = JobStatus.COMPLETED, None
        else:
            status = JobStatus.FAILED
            if jail.out_of_memory():
                error = f"memory limit exceeded ({self.spec.limits.max_memory_bytes} bytes)"
            elif sig is not None:
                error = f"killed by {sig}"
            else:
                error = f"exited with status {exit_code}"
        return Outcome(status, exit_code, sig, error, self._truncated)

    def _emit(self, name: str, raw_lines: list[bytes]) -> None:
        if self._truncated or not raw_lines:
            return  # over the cap: the rest is drained and dropped while the tree is killed
        limits = self.spec.limits
        lengths = list(map(len, raw_lines))
        size, count = sum(lengths), len(lengths)
        # a line costs its bytes and its newline, at least MIN_LINE_CHARGE
        charge = size + count
        if min(lengths) < MIN_LINE_CHARGE - 1:
            charge = sum(max(length + 1, MIN_LINE_CHARGE) for length in lengths)
        if max(lengths) <= limits.max_line_bytes and self._charged + charge <= limits.max_output_bytes:
            # the common case, in bulk: UTF-8 resynchronises at "\n", so one decode equals one per line
            self._charged += charge
            self.output_bytes += size + count
            self._sink(name, b"\n".join(raw_lines).decode("utf-8", "replace").split("\n"))
        else:
            self._emit_each(name, raw_lines)

    def _emit_each(self, name: str, raw_lines: list[bytes]) -> None:
        """Line by line: long lines split, the output cap applied where it falls."""
        max_line = self.spec.limits.max_line_bytes
        cap = self.spec.limits.max_output_bytes
        lines = []
        for raw in raw_lines:
            for piece in _pieces(raw, max_line):
                self._charged += max(len(piece) + 1, MIN_LINE_CHARGE)
                if self._charged > cap:
                    self._truncated = True
                    self.stop(JobStatus.FAILED, f"output exceeded max_output_bytes ({cap} bytes); the job was stopped")
                    break
                self.output_bytes += len(piece) + 1
                lines.append(piece.decode("utf-8", "replace"))
            if self._truncated:
                break
        self._sink(name, lines)

    def _sink(self, name: str, lines: list[str]) -> None:
        if lines:
            try:
                self.sink(name, lines)
            except OSError as exc:
                self._truncated = True
                self.stop(JobStatus.FAILED, f"cannot write the job log: {exc.strerror}")


class _LineReader(asyncio.Protocol):
    """One pipe of the tool, split into lines as each read arrives (no task, no buffer
    between the pipe and the log): complete lines go to `emit` in one batch per read."""

    def __init__(self, name: str, emit: Callable[[str, list[bytes]], None], max_line: int) -> None:
        self.name = name
        self.emit = emit
        self.max_line = max_line
        self.partial = b""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, chunk: bytes) -> None:
        # "\r\n" ends a line like "\n"; joined first, so a pair cut between reads still counts
        *lines, partial = (self.partial + chunk).replace(b"\r\n", b"\n").split(b"\n")
        # an unfinished line is cut only where a finished one would be: a "\r" at its
        # end may yet be part of "\r\n", so it does not count
        while len(partial.removesuffix(b"\r")) > self.max_line:
            head, partial = _split_at(partial, self.max_line)
            lines.append(head)
        self.partial = partial
        self.emit(self.name, lines)

    def eof_received(self) -> None:
        if self.partial:
            self.emit(self.name, [self.partial])
            self.partial = b""

    def connection_lost(self, exc: Exception | None) -> None:
        _resolve(self.closed)


class _Pipes:
    """A child's stdout and stderr, read on the loop into `emit`; closed on exit."""

    def __init__(self, child: subprocess.Popen[bytes], emit: Callable[[str, list[bytes]], None], max_line: int) -> None:
        self.child = child
        self.emit = emit
        self.max_line = max_line
        self.readers: list[_LineReader] = []
        self.transports: list[asyncio.BaseTransport] = []

    async def __aenter__(self) -> _Pipes:
        loop = asyncio.get_running_loop()
        for name, pipe in (("stdout", self.child.stdout), ("stderr", self.child.stderr)):
            assert pipe is not None
            try:
                transport, reader = await loop.connect_read_pipe(
                    functools.partial(_LineReader, name, self.emit, self.max_line), pipe
                )
            except BaseException:
                pipe.close()
                await self.__aexit__()
                raise
            with contextlib.suppress(AttributeError):  # (asyncio's pipe transport has it; uvloop's not)
                transport.max_size = PIPE_READ_BYTES  # type: ignore[attr-defined]
            self.readers.append(reader)
            self.transports.append(transport)
        return self

    async def drained(self, timeout_s: float) -> None:
        """Wait until both pipes reach their end; past `timeout_s` a descendant out of our
        reach still holds one, and it is closed unread."""
        await asyncio.wait([reader.closed for reader in self.readers], timeout=timeout_s)

    async def __aexit__(self, *_: object) -> None:
        for transport in self.transports:
            transport.close()
        for pipe in (self.child.stdout, self.child.stderr):
            if pipe is not None:
                pipe.close()


@contextlib.asynccontextmanager
async def _exit_of(child: subprocess.Popen[bytes]) -> AsyncIterator[asyncio.Future[None]]:
    """A future that resolves when `child` exits, even while a descendant still holds its
    pipes; the child is reaped on the way out (killed first if it still runs)."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()
    try:
        pidfd = os.pidfd_open(child.pid)
    except OSError:  # no pidfd (Linux < 5.3): a thread waits instead
        waiter = asyncio.ensure_future(asyncio.to_thread(child.wait))
        waiter.add_done_callback(lambda _: _resolve(exited))
        pidfd = -1
    else:
        loop.add_reader(pidfd, _resolve, exited)
    try:
        yield exited
    finally:
        if pidfd >= 0:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        if exited.done():
            child.wait()  # it has exited: this only reaps it
        else:  # left early (cancelled): make sure it ends, then reap it off the loop
            _signal_group(child.pid, signal.SIGKILL)
            await asyncio.to_thread(child.wait, REAP_BOUND_S)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _pieces(raw: bytes, max_line: int) -> list[bytes]:
    pieces = []
    while len(raw) > max_line:
        head, raw = _split_at(raw, max_line)
        pieces.append(head)
    pieces.append(raw)
    return pieces


def _split_at(raw: bytes, limit: int) -> tuple[bytes, bytes]:
    """Split before `limit`, backing off so a UTF-8 character is not cut in two."""
    cut = limit
    while cut > limit - 3 and (raw[cut] & 0xC0) == 0x80:
        cut -= 1
    return raw[:cut], raw[cut:]


async def _group_gone(pgid: int, deadline: float) -> None:
    """Until no process is left in the group, or `deadline` (loop time): a look every
    GROUP_POLL_S. (No event tells of a group's end; this runs only while a job is stopped.)"""
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass  # someone's left in it that we may not signal: it is not gone
        await asyncio.sleep(min(GROUP_POLL_S, max(deadline - loop.time(), 0)))


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _empty(sandbox: Sandbox, jail: Jail) -> bool:
    """Hand the job's cgroups back once their last process is gone (bounded): at once, as a
    rule, since the run killed what was left; else kill again and retry. Whether they emptied."""
    for _ in range(50):
        if sandbox.release(jail):
            return True
        jail.kill_all()
        await asyncio.sleep(0.02)
    return False
