"""Open SSE sessions: each a reader with a cursor into its job's log, all known to a registry."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp_sse import EventSourceResponse

from .errors import PastLastEvent
from .joblog import EventLog
from .logs import ACCESS_LOG, log_access, request_fields

log = logging.getLogger(__name__)

#: at most this much is handed to one socket write (a slow reader holds no more than this)
MAX_WRITE_BYTES = 256 * 1024
#: at most this many such writes per turn of the loop when a session catches up
PUMP_WRITES = 4
HEARTBEAT = b": ping\n\n"


class Session(asyncio.Protocol):
    """One subscriber of one job, fed from the job's log with no task of its own.

    Once its response's head and first frame are out, the session takes the connection
    over from aiohttp (`attach`): it becomes the transport's protocol, and aiohttp forgets
    the connection, its request and its handler (about 9 KiB a stream). From then on it
    writes, chunk-framed, everything after its cursor: when the log appends (`_on_append`),
    when the socket takes more (`resume_writing`), when a heartbeat is due (the registry's
    timer, which also cuts a peer whose socket has taken nothing for `stall_s`). A slow
    reader only falls behind in the log, which keeps the bytes. The response ends with the
    job's terminal event, or at a `close()`, and the connection with it."""

    def __init__(
        self, job_id: str, joblog: EventLog, cursor: int, heartbeat_s: float, registry: SessionRegistry
    ) -> None:
        self.job_id = job_id
        self.log = joblog
        self.cursor = cursor
        self.heartbeat_s = heartbeat_s
        self.registry = registry
        self.events_sent = 0
        self.bytes_sent = 0
        self.transport: asyncio.Transport | None = None
        self.chunked = True
        #: the socket takes no more for now (its buffer is over the high-water mark)
        self.paused = False
        #: since when (loop time) the socket has taken nothing (None: it takes writes)
        self.writing_since: float | None = None
        self.last_beat = asyncio.get_running_loop().time()
        #: the response has ended, or the connection has gone: nothing more is written
        self.done = False
        #: the access line's fields of the request, and when it began (written at the end)
        self._access: dict[str, Any] = {}
        self._began = 0.0

    def attach(self, request: web.BaseRequest, response: SessionResponse) -> None:
        """Take the connection of `request`, whose response has sent its head, over from
        aiohttp, if it is still open (else aiohttp ends the request as any other)."""
        transport = request.transport
        handler = request.protocol
        if transport is None or transport.is_closing() or not isinstance(transport, asyncio.Transport):
            return
        response.hand_over()
        self._access, self._began = request_fields(request), asyncio.get_running_loop().time()
        self.chunked = response.headers.get("Transfer-Encoding") == "chunked"  # (not to an HTTP/1.0 peer)
        self.transport = transport
        transport.set_protocol(self)
        handler.transport = None  # aiohttp must not close it when its request is done ...
        request.task.add_done_callback(lambda _: handler.connection_lost(None))  # ... and then lets go
        if not transport.is_reading():
            transport.resume_reading()  # to see the peer leave
        self.registry.add(self)
        self.log.watch(self._on_append)
        self._pump()

    def opening(self, retry: bytes) -> bytes:
        """The response's first chunk, which goes out with its head: `retry`, then what the
        log holds after the cursor, up to one write's bound (the cursor moves past it)."""
        try:
            blob, cursor = self.log.frames_after(self.cursor, MAX_WRITE_BYTES)
        except OSError:  # the log vanished under us (retention): the pump meets it and aborts
            return retry
        self._sent(blob, cursor)
        return retry + blob

    def close(self) -> None:
        """End the session from the server's side (it stops), at once: without a terminal
        event if its job goes on; cut off if its reader is behind or its socket takes nothing.
        Either way the client resumes where it stopped, after the restart."""
        if self.done:
            return
        if self.paused or self.log.finished:  # (a finished log not yet ended: behind)
            self.abort()
        else:
            self._end()

    def tick(self, now: float, tick_s: float, stall_s: float) -> None:
        """The registry's timer: abort the connection if its socket has taken nothing for
        `stall_s`; else write a heartbeat if the next tick would be too late for one."""
        if self.writing_since is not None and now - self.writing_since >= stall_s:
            self.abort()  # (also after the response's end, while its last bytes wait)
        elif not self.done and now - self.last_beat >= self.heartbeat_s - tick_s:
            self.last_beat = now
            self._send(HEARTBEAT)

    def abort(self) -> None:
        """Cut the connection: what was sent cannot be completed and must not look whole."""
        self.done = True
        if self.transport is not None:
            self.transport.abort()

    # --- the transport's calls (asyncio.Protocol) ------------------------------------------

    def pause_writing(self) -> None:
        self.paused = True
        self.writing_since = asyncio.get_running_loop().time()

    def resume_writing(self) -> None:
        self.paused = False
        self.writing_since = None
        # not from inside the transport's own write path: a pump that ends the stream there
        # (its last write, then a close) would have asyncio call connection_lost twice
        asyncio.get_running_loop().call_soon(self._pump)

    def data_received(self, data: bytes) -> None:
        pass  # a subscriber has nothing more to say; what it sends is dropped

    def eof_received(self) -> bool:
        return False  # the peer is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        self.log.unwatch(self._on_append)
        self.registry.remove(self)
        seconds = asyncio.get_running_loop().time() - self._began
        log_access(ACCESS_LOG, self._access, 200, self.bytes_sent, seconds)

    # --- writing ----------------------------------------------------------------------------

    def _on_append(self, frames: bytes, after: int) -> None:
        """The log's call after an append: the new frames go out at once if the session had
        everything before them and the socket takes more; else the pump catches up."""
        if self.done or self.paused:
            return  # `resume_writing` pumps
        if self.cursor == after:
            self._write(frames, self.log.last_seq)
        else:
            self._pump()

    def _pump(self) -> None:
        """Write what the log holds after the cursor while the socket takes it, a bounded
        amount per turn of the loop; end the response at the job's end."""
        for _ in range(PUMP_WRITES):
            if self.done or self.paused:
                return
            if self.cursor >= self.log.last_seq:
                if self.log.finished:
                    self._end(self._past_the_end())
                return  # following: the log's call brings what comes next
            try:
                blob, cursor = self.log.frames_after(self.cursor, MAX_WRITE_BYTES)
            except OSError:  # the log vanished under us (retention)
                return self.abort()
            self._write(blob, cursor)
        asyncio.get_running_loop().call_soon(self._pump)  # more to write: after others had a turn

    def _write(self, blob: bytes, cursor: int) -> None:
        """Write `blob`, the frames up to event `cursor`; with them the response's end, in
        one write, when they end the job's log."""
        self._sent(blob, cursor)
        if self.log.finished and cursor >= self.log.last_seq:
            self._end(self._framed(blob))
        else:
            self._send(blob)

    def _send(self, data: bytes) -> None:
        if self.transport is not None and not self.done:
            self.transport.write(self._framed(data))

    def _framed(self, data: bytes) -> bytes:
        return self.registry.chunk(data) if self.chunked else data

    def _sent(self, blob: bytes, cursor: int) -> None:
        self.events_sent += cursor - self.cursor
        self.bytes_sent += len(blob)
        self.cursor = cursor

    def _past_the_end(self) -> bytes:
        """Nothing; or, for a subscriber that resumed from an id the job never reached (not
        one from this job's log), a terminal `error` event without an id, with the message
        of the 409 it would get now: its stream must not end with no terminal event."""
        if self.cursor <= self.log.last_seq:
            return b""
        message = PastLastEvent(self.cursor, self.log.last_seq).message
        return self._framed(f"event: error\ndata: {json.dumps({'message': message})}\n\n".encode())

    def _end(self, last: bytes = b"") -> None:
        """End the response (`last`, framed, then its last chunk), then the connection:
        nothing follows on it."""
        if self.transport is not None and not self.done:
            self.transport.write(last + b"0\r\n\r\n" if self.chunked else last)
            self.transport.close()
        self.done = True


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
        #: the last data chunk-framed, and its chunk: every follower of an append writes the
        #: same frames, framed once (b"" frames as the last chunk, which no session writes so)
        self._last_chunk = (b"", b"0\r\n\r\n")

    def chunk(self, data: bytes) -> bytes:
        """`data` as one HTTP/1.1 chunk; framed once for all the sessions that write it."""
        if data is not self._last_chunk[0]:
            self._last_chunk = (data, b"%x\r\n%b\r\n" % (len(data), data))
        return self._last_chunk[1]

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
    """aiohttp-sse's response (the SSE head, and TCP_USER_TIMEOUT so that the kernel drops a
    peer that acknowledges nothing for `send_timeout`) for a connection that ends with its
    stream: once its head and first frame are out, its `Session` takes the connection
    over and aiohttp writes nothing more on it. No ping task: the registry's timer has the
    sessions write the heartbeats."""

    def __init__(self, send_timeout: float) -> None:
        super().__init__(send_timeout=send_timeout)
        self.headers["Connection"] = "close"
        self.force_close()
        self._handed_over = False

    #: the head waits for the first chunk, to go out with it in one packet (aiohttp's Response does this)
    _send_headers_immediately = False

    async def _ping(self) -> None:
        return

    def hand_over(self) -> None:
        self._handed_over = True

    @property
    def logged_at_its_end(self) -> bool:
        """Whether its access line is its session's, written when the stream ends."""
        return self._handed_over

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self._handed_over:  # aiohttp prepares a handler's response again when it is done
            return None
        return await super().prepare(request)

    async def write_eof(self, data: bytes = b"") -> None:
        if not self._handed_over:  # (after a hand-over the session ends the body itself)
            await super().write_eof(data)
