"""Open SSE sessions: each a reader with a cursor into its job's log, all known to a registry."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterator

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from .joblog import EventLog

log = logging.getLogger(__name__)

#: at most this much is handed to one socket write (a slow reader holds no more than this)
MAX_WRITE_BYTES = 256 * 1024
HEARTBEAT = b": ping\n\n"


class Session:
    """One subscriber of one job. It writes everything after its cursor in one write, so a
    slow reader only falls behind in the log, which keeps the bytes.

    It is one task that waits on one future of its own, resolved by the log's call at an
    append, by the registry's timer when a heartbeat is due, or by `close()` when the
    server ends the stream. While it waits with nothing unsent, the log's call writes what
    is new itself, when the socket takes it without waiting (see `_on_append`). A client
    that leaves cancels the handler (the server runs with handler cancellation); a write
    stalled on its peer is aborted by the registry's timer."""

    def __init__(
        self, job_id: str, response: SessionResponse, joblog: EventLog, cursor: int, heartbeat_s: float
    ) -> None:
        self.job_id = job_id
        self.response = response
        self.log = joblog
        self.cursor = cursor
        self.heartbeat_s = heartbeat_s
        self.events_sent = 0
        self.bytes_sent = 0
        #: the server is ending this session (it stops)
        self.closing = False
        #: the loop time the write in progress began (None: not writing)
        self.writing_since: float | None = None
        self.last_beat = asyncio.get_running_loop().time()
        self.beat_due = False
        self._waiter: asyncio.Future[None] | None = None
        #: the task waits on `_waiter` with everything up to the log's end written
        self._following = False

    def close(self) -> None:
        """End the session from the server's side: at once, without a terminal event, if
        its job goes on (the client resumes where it stopped); else after its end."""
        self.closing = True
        self._wake()

    async def serve(self, retry_ms: int) -> None:
        """Replay, then follow live, until the job's terminal event, a disconnect or a close."""
        loop = asyncio.get_running_loop()
        self.log.watch(self._on_append)
        try:
            await self._write(f"retry: {retry_ms}\n\n".encode())
            while True:
                if self.beat_due:
                    self.beat_due = False
                    await self._write(HEARTBEAT)
                elif self.closing and not self.log.finished:  # the service stops; the job goes on after
                    await self._end()
                    return
                elif self.cursor < self.log.last_seq:
                    blob, cursor = self.log.frames_after(self.cursor, MAX_WRITE_BYTES)
                    await self._write(blob)
                    self._sent(blob, cursor)
                elif self.log.finished:
                    await self._end()
                    return
                else:
                    self._waiter = loop.create_future()
                    self._following = True
                    try:
                        await self._waiter
                    finally:
                        self._following = False
        except ConnectionError:
            return  # the subscriber left, or its stalled connection was aborted; it may resume
        except OSError:  # the log vanished under us (retention): a cut stream must not look whole
            self._abort()
        finally:
            self.log.unwatch(self._on_append)

    def tick(self, now: float, tick_s: float, stall_s: float) -> None:
        """The registry's timer: abort the connection if one write has waited on the peer
        for `stall_s`; else ask for a heartbeat if the next tick would be too late for one."""
        if self.writing_since is not None and now - self.writing_since >= stall_s:
            self._abort()
        elif now - self.last_beat >= self.heartbeat_s - tick_s:
            self.last_beat = now
            self.beat_due = True
            self._wake()

    def _on_append(self, frames: bytes, after: int) -> None:
        """The log's call after an append. While following, the new frames go out from here
        when the socket's buffer is empty: no task switch per event, which was most of a
        live event's cost. A lagging peer and the log's end wake the task, which waits for
        the peer (watched for a stall) and ends the stream."""
        following = self._following and self.cursor == after and not self.log.finished
        if following and self.response.write_now(frames):
            self._sent(frames, self.log.last_seq)
        else:
            self._wake()

    def _sent(self, blob: bytes, cursor: int) -> None:
        self.events_sent += cursor - self.cursor
        self.bytes_sent += len(blob)
        self.cursor = cursor

    async def _end(self) -> None:
        await self._watched(self.response.write_eof())  # a peer may stall here too

    async def _write(self, blob: bytes) -> None:
        await self._watched(self.response.write(blob))

    async def _watched(self, write: Awaitable[None]) -> None:
        """Await a write to the peer, watched by the registry's timer for a stall."""
        self.writing_since = asyncio.get_running_loop().time()
        try:
            await write
        finally:
            self.writing_since = None

    def _abort(self) -> None:
        abort(self.response._req)  # aiohttp-sse aborts a stalled peer the same way

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def abort(request: web.BaseRequest | None) -> None:
    """Cut the connection: a response that cannot be completed must not look whole."""
    if request is not None and request.transport is not None:
        request.transport.abort()


class SessionRegistry:
    """Every open session, by job: for counting, isolation, shutdown, and the one timer that
    gives every session its heartbeats and cuts stalled peers off (not a task per stream)."""

    def __init__(self, stall_s: float, tick_s: float) -> None:
        self.stall_s = stall_s
        self.tick_s = tick_s
        self._sessions: dict[str, set[Session]] = {}
        self._closed_events = 0
        self._closed_bytes = 0
        #: the service is stopping: every session is closed, new ones at once
        self._closed = False

    def add(self, session: Session) -> None:
        self._sessions.setdefault(session.job_id, set()).add(session)
        if self._closed:  # it began as the service stopped
            session.close()

    def remove(self, session: Session) -> None:
        sessions = self._sessions[session.job_id]
        sessions.discard(session)
        self._closed_events += session.events_sent
        self._closed_bytes += session.bytes_sent
        if not sessions:
            del self._sessions[session.job_id]

    def count(self, job_id: str | None = None) -> int:
        if job_id is not None:
            return len(self._sessions.get(job_id, ()))
        return sum(len(sessions) for sessions in self._sessions.values())

    def sent(self) -> tuple[int, int]:
        """Events and bytes written to subscribers so far, closed sessions included."""
        live = list(self._all())
        events = self._closed_events + sum(session.events_sent for session in live)
        return events, self._closed_bytes + sum(session.bytes_sent for session in live)

    async def run_timer(self) -> None:
        """Until cancelled: every `tick_s`, each session's heartbeat and stall check."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick_s)
            now = loop.time()
            for session in list(self._all()):
                try:
                    session.tick(now, self.tick_s, self.stall_s)
                except Exception:  # a bug must cost one stream its heartbeat, never every stream
                    log.exception("stream timer: session of job %s", session.job_id)

    def close_all(self) -> None:
        self._closed = True
        for session in self._all():
            session.close()

    def _all(self) -> Iterator[Session]:
        for sessions in self._sessions.values():
            yield from sessions


class SessionResponse(EventSourceResponse):
    """aiohttp-sse's response (the SSE headers, and TCP_USER_TIMEOUT so that the kernel
    drops a peer that acknowledges nothing for `send_timeout`), without its ping task:
    the registry's timer has the session write the heartbeats, so an open stream costs
    one task, not two. `write_now` is a write that never waits."""

    async def _ping(self) -> None:
        return

    def write_now(self, data: bytes) -> bool:
        """Hand `data` to the socket at once if nothing is queued before it; else (or if the
        connection is closing) send nothing and say False: then `await write(data)`, which
        waits for the peer. For a response already started with `write()` (its head sent)."""
        writer = self._payload_writer
        transport = self._req.transport if self._req is not None else None
        if writer is None or transport is None or transport.is_closing() or transport.get_write_buffer_size():
            return False
        chunked = self.headers.get("Transfer-Encoding") == "chunked"  # (not to an HTTP/1.0 peer)
        transport.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
        writer.output_size += len(data)  # the body's size, for the access log
        return True
