"""Open SSE sessions: each a reader with a cursor into its job's log, all known to a registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator

from aiohttp_sse import EventSourceResponse

from .joblog import EventLog

#: at most this much is handed to one socket write (a slow reader holds no more than this)
MAX_WRITE_BYTES = 256 * 1024


class Session:
    """One subscriber of one job. Woken by the log, it writes everything after its cursor
    in one write, so a slow reader only falls behind in the log, which keeps the bytes.

    It waits on nothing but the log: a client that leaves cancels its handler (the server
    runs with handler cancellation), a stalled write is aborted by the registry's sweep, and
    `close()` wakes it through the log. An idle session is one task and its response."""

    def __init__(self, job_id: str, response: EventSourceResponse, joblog: EventLog, cursor: int) -> None:
        self.job_id = job_id
        self.response = response
        self.log = joblog
        self.cursor = cursor
        self.events_sent = 0
        self.bytes_sent = 0
        #: why the server ends this session, once it does
        self.closing: str | None = None
        #: the loop time the write in progress began (None: not writing)
        self.writing_since: float | None = None

    def close(self, message: str) -> None:
        """End the session from the server's side with a final `error` event."""
        if self.closing is None:
            self.closing = message
            self.log.wake()

    async def serve(self, retry_ms: int) -> None:
        """Replay, then follow live, until the job's terminal event, a close or a disconnect."""
        try:
            await self._write(f"retry: {retry_ms}\n\n".encode())
            while self.closing is None:
                if self.cursor < self.log.last_seq:
                    blob, cursor = self.log.frames_after(self.cursor, MAX_WRITE_BYTES)
                    await self._write(blob)
                    self.events_sent += cursor - self.cursor
                    self.bytes_sent += len(blob)
                    self.cursor = cursor
                elif self.log.finished:
                    return
                else:
                    await self.log.changed()
            message = json.dumps({"message": self.closing})
            await self._write(f"event: error\ndata: {message}\n\n".encode())
        except ConnectionError:
            return  # the subscriber left, or its stalled connection was aborted; it may resume
        except OSError:
            return  # the log vanished under us (retention); end the response

    async def _write(self, blob: bytes) -> None:
        self.writing_since = asyncio.get_running_loop().time()
        try:
            await self.response.write(blob)
        finally:
            self.writing_since = None

    def abort_if_stalled(self, now: float, stall_s: float) -> bool:
        """Abort the connection if one write has waited on the peer for `stall_s`."""
        if self.writing_since is None or now - self.writing_since < stall_s:
            return False
        request = self.response._req  # aiohttp-sse aborts a stalled peer the same way
        if request is not None and request.transport is not None:
            request.transport.abort()
        return True


class SessionRegistry:
    """Every open session, by job: for counting, isolation, stalled peers and shutdown."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self._sessions: dict[str, set[Session]] = {}
        self._closed_events = 0
        self._closed_bytes = 0

    @contextlib.contextmanager
    def open(self, session: Session) -> Iterator[Session]:
        self._sessions.setdefault(session.job_id, set()).add(session)
        try:
            yield session
        finally:
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
        live = [session for sessions in self._sessions.values() for session in sessions]
        events = self._closed_events + sum(session.events_sent for session in live)
        return events, self._closed_bytes + sum(session.bytes_sent for session in live)

    async def sweep_stalls(self) -> None:
        """Until cancelled: abort every session whose write has waited `stall_s` on its
        peer (one timer for all sessions, not one per write; checked every `stall_s` / 4,
        at least once a second). The subscriber may resume with Last-Event-ID."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(self.stall_s / 4, 1.0))
            now = loop.time()
            for session in [session for sessions in self._sessions.values() for session in sessions]:
                session.abort_if_stalled(now, self.stall_s)

    def close_all(self, message: str) -> None:
        for sessions in self._sessions.values():
            for session in sessions:
                session.close(message)


def make_response(heartbeat_s: float, stall_s: float) -> EventSourceResponse:
    """aiohttp-sse's response: the SSE headers, a heartbeat comment every `heartbeat_s`."""
    return EventSourceResponse(ping_interval=heartbeat_s, send_timeout=stall_s)
