"""Open SSE sessions: each a reader with a cursor into its job's log, all known to a registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

from aiohttp_sse import EventSourceResponse

from .joblog import EventLog

#: at most this much is handed to one socket write (a slow reader holds no more than this)
MAX_WRITE_BYTES = 256 * 1024


class Session:
    """One subscriber of one job. Woken by the log, it writes everything after its cursor
    in one write, so a slow reader only falls behind in the log, which keeps the bytes."""

    def __init__(self, job_id: str, response: EventSourceResponse, joblog: EventLog, cursor: int) -> None:
        self.job_id = job_id
        self.response = response
        self.log = joblog
        self.cursor = cursor
        self.events_sent = 0
        self.bytes_sent = 0
        self._closing: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def close(self, message: str) -> None:
        """End the session from the server's side with a final `error` event."""
        if not self._closing.done():
            self._closing.set_result(message)

    async def serve(self, retry_ms: int, stall_s: float) -> None:
        """Replay, then follow live, until the job's terminal event, a close or a disconnect."""
        gone = asyncio.ensure_future(self.response.wait())
        try:
            await self._write(f"retry: {retry_ms}\n\n".encode(), stall_s)
            while not gone.done() and not self._closing.done():
                if self.cursor < self.log.last_seq:
                    blob, cursor = self.log.frames_after(self.cursor, MAX_WRITE_BYTES)
                    await self._write(blob, stall_s)
                    self.events_sent += cursor - self.cursor
                    self.bytes_sent += len(blob)
                    self.cursor = cursor
                elif self.log.finished:
                    return
                else:
                    wakers: set[asyncio.Future[Any]] = {self.log.changed(), gone, self._closing}
                    await asyncio.wait(wakers, return_when=asyncio.FIRST_COMPLETED)
            if self._closing.done() and not gone.done():
                message = json.dumps({"message": self._closing.result()})
                await self._write(f"event: error\ndata: {message}\n\n".encode(), stall_s)
        except (ConnectionError, TimeoutError):
            return  # the subscriber left or stalled; it may resume with Last-Event-ID
        except OSError:
            return  # the log vanished under us (retention); end the response
        finally:
            gone.cancel()

    async def _write(self, blob: bytes, stall_s: float) -> None:
        try:
            async with asyncio.timeout(stall_s):
                await self.response.write(blob)
        except TimeoutError:
            request = self.response._req  # aiohttp-sse aborts a stalled peer the same way
            if request is not None and request.transport is not None:
                request.transport.abort()
            raise


class SessionRegistry:
    """Every open session, by job: for counting, isolation and shutdown."""

    def __init__(self) -> None:
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

    def close_all(self, message: str) -> None:
        for sessions in self._sessions.values():
            for session in sessions:
                session.close(message)


def make_response(heartbeat_s: float, stall_s: float) -> EventSourceResponse:
    """aiohttp-sse's response: the SSE headers, a heartbeat comment every `heartbeat_s`."""
    return EventSourceResponse(ping_interval=heartbeat_s, send_timeout=stall_s)
