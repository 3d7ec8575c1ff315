"""A small async client of the streamsvc HTTP API, used by the command line and by scripts/.

    async with Client("http://127.0.0.1:8080", token) as client:
        job = await client.execute("progress", "hello")
        async for event in client.follow(job["jobId"]):
            ...

`follow` parses the SSE stream itself and, when the connection drops before the job's
terminal event, reconnects with `Last-Event-ID`: every event arrives exactly once.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import aiohttp
import attrs

#: events after which the server ends a stream
TERMINAL = frozenset({"complete", "error"})
#: the statuses of a job that has ended
FINISHED = frozenset({"completed", "failed", "timeout", "cancelled", "lost"})
#: bounds on one connection: to connect, and on silence (the server sends a heartbeat every 15 s)
CONNECT_BOUND_S = 10.0
READ_IDLE_S = 60.0
#: reconnecting: the first wait is the server's `retry:`, then doubling up to this
MAX_BACKOFF_S = 10.0
DEFAULT_RETRY_S = 2.0
#: a stream with neither an event nor a heartbeat for this long is given up
GIVE_UP_S = 60.0
#: the largest event (or line) the parser buffers; a `complete` event holds the job's result lines
MAX_EVENT_CHARS = 256 * 1024 * 1024
_NEWLINE = re.compile(r"\r\n|\r|\n")


class ClientError(Exception):
    """An error the service answered with (its envelope), or status 0 when it could not be reached."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{message} ({status} {code})" if status else message)
        self.status = status
        self.code = code
        self.message = message


class Unreachable(ClientError):
    """The service could not be reached, or a stream could not be resumed within the bound."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "unreachable", message)


@attrs.frozen
class Event:
    """One SSE event: `data` is the parsed JSON (the raw text when it is not JSON)."""

    event: str
    data: Any
    id: int | None = None


class SSEParser:
    """The `text/event-stream` format: feed it bytes as they come, get the events they complete.
    Lines end with CRLF, LF or CR; comments are skipped; `retry:` is kept in `retry_ms`."""

    def __init__(self) -> None:
        self.retry_ms: int | None = None
        #: comment lines seen so far (the server's heartbeats)
        self.comments = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial: list[str] = []
        self._partial_chars = 0
        self._after_cr = False
        self._reset()

    def _reset(self) -> None:
        self._event = ""
        self._id: str | None = None
        self._data: list[str] = []
        self._data_chars = 0

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        for line in self._lines(self._decoder.decode(chunk)):
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _lines(self, text: str) -> list[str]:
        if self._after_cr and text.startswith("\n"):
            text = text[1:]  # the LF of a CRLF split across chunks
        if text:
            self._after_cr = text.endswith("\r")
        *complete, rest = _NEWLINE.split(text)
        if complete:
            complete[0] = "".join(self._partial) + complete[0]
            self._partial, self._partial_chars = [], 0
        if rest:
            self._partial.append(rest)
            self._partial_chars += len(rest)
            self._check(self._partial_chars)
        return complete

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
            self._data_chars += len(value) + 1
            self._check(self._data_chars)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Event | None:
        event, seq, data = self._event or "message", self._id, self._data
        self._reset()
        if not data:
            return None
        text = "\n".join(data)
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return Event(event, parsed, int(seq) if seq and seq.isascii() and seq.isdigit() else None)

    @staticmethod
    def _check(chars: int) -> None:
        if chars > MAX_EVENT_CHARS:
            raise ClientError(0, "event_too_large", f"an event of the stream exceeds {MAX_EVENT_CHARS} characters")


class Client:
    """The API over one HTTP session: an async context manager."""

    def __init__(self, url: str, token: str | None = None, *, give_up_s: float = GIVE_UP_S) -> None:
        self.url = url.rstrip("/")
        self.give_up_s = give_up_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_BOUND_S, sock_read=READ_IDLE_S)
        self._http = aiohttp.ClientSession(headers=self._headers, timeout=timeout)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._http is not None:
            await self._http.close()

    # --- the API -----------------------------------------------------------------------

    async def execute(self, tool: str, project: str) -> dict[str, Any]:
        """Submit a job; its `jobId`, `status`, `streamUrl`, `jobUrl`."""
        return _mapping(await self._call("POST", "/api/execute", json={"toolId": tool, "projectId": project}))

    async def job(self, job_id: str) -> dict[str, Any]:
        return _mapping(await self._call("GET", f"/api/jobs/{_segment(job_id)}"))

    async def jobs(self, status: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Jobs, newest first."""
        query = {k: str(v) for k, v in (("status", status), ("limit", limit)) if v is not None}
        return _records(await self._call("GET", "/api/jobs", params=query))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return _mapping(await self._call("DELETE", f"/api/jobs/{_segment(job_id)}"))

    async def tools(self) -> list[dict[str, Any]]:
        return _records(await self._call("GET", "/api/tools"))

    async def projects(self) -> list[dict[str, Any]]:
        return _records(await self._call("GET", "/api/projects"))

    async def upload(self, path: Path) -> dict[str, Any]:
        """Upload a zip as a new project (the file is streamed, never read whole); its `projectId`."""
        with path.open("rb") as body:
            headers = {"Content-Type": "application/zip"}
            return _mapping(await self._call("POST", "/api/projects", data=body, headers=headers))

    async def log(self, job_id: str) -> str:
        """The job's whole output so far, as text."""
        async with await self._send("GET", f"/api/jobs/{_segment(job_id)}/log") as response:
            await _raise_for(response)
            return await response.text(errors="replace")

    async def follow(self, job_id: str, last_event_id: int = 0) -> AsyncIterator[Event]:
        """The job's events after `last_event_id` through its terminal event, each exactly once;
        none when the job had ended by `last_event_id`."""
        async for batch in self.follow_batches(job_id, last_event_id):
            for event in batch:
                yield event

    async def follow_batches(self, job_id: str, last_event_id: int = 0) -> AsyncIterator[list[Event]]:
        """`follow`, in the batches the events arrive in (to flush output once per batch)."""
        loop = asyncio.get_running_loop()
        cursor = _Cursor(last_event_id, alive_at=loop.time())
        while True:
            parser, fresh = SSEParser(), 0
            try:
                async with await self._open_stream(job_id, cursor) as response:
                    cursor.opened = True
                    async for chunk in response.content.iter_any():
                        batch = cursor.fresh(parser.feed(chunk), loop.time())
                        fresh += len(batch)
                        if batch:
                            yield batch
                        if cursor.done:
                            return
                if not fresh and await self._finished(job_id):
                    return  # it ended at or before `last_event_id`: nothing follows
                reason = "the stream ended before the job did"
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                reason = str(exc) or type(exc).__name__
            await self._pause(cursor, parser, loop.time(), f"lost the stream of job {job_id}: {reason}")

    # --- plumbing ----------------------------------------------------------------------

    async def _open_stream(self, job_id: str, cursor: _Cursor) -> aiohttp.ClientResponse:
        """A 200 stream response after `cursor.last`. Once a stream was open, failing to reach the
        service or a 5xx is a dropped connection (to resume); before, it is final."""
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(cursor.last)}
        try:
            response = await self._send("GET", f"/api/stream/{_segment(job_id)}", headers=headers)
        except Unreachable as exc:
            if cursor.opened:
                raise aiohttp.ClientConnectionError(exc.message) from None
            raise
        if response.status >= 500 and cursor.opened:
            response.release()
            raise aiohttp.ClientConnectionError(f"the service answered {response.status}")
        try:
            await _raise_for(response)
        except ClientError:
            response.release()
            raise
        return response

    async def _finished(self, job_id: str) -> bool:
        """Whether the job has ended (False when the service cannot say now)."""
        try:
            return (await self.job(job_id)).get("status") in FINISHED
        except Unreachable:
            return False

    async def _pause(self, cursor: _Cursor, parser: SSEParser, now: float, why: str) -> None:
        """Wait before reconnecting: the server's `retry:`, doubled per failure in a row; give up
        after `give_up_s` without an event or a heartbeat."""
        if parser.comments:
            cursor.alive_at = now
        if parser.retry_ms is not None:
            cursor.retry_s = parser.retry_ms / 1000
        if now - cursor.alive_at > self.give_up_s:
            raise Unreachable(f"{why} (no event for {self.give_up_s:g} s after event {cursor.last})")
        await asyncio.sleep(min(max(cursor.retry_s, 0.05) * 2**cursor.failures, MAX_BACKOFF_S))
        cursor.failures += 1

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API request; the `data` of its success envelope."""
        async with await self._send(method, path, **kwargs) as response:
            await _raise_for(response)
            try:
                body = await response.json(content_type=None)
            except ValueError:
                body = None
            if not isinstance(body, dict) or "data" not in body:
                raise ClientError(response.status, "bad_response", f"{self.url} does not answer as streamsvc")
            return body["data"]

    async def _send(self, method: str, path: str, **kwargs: Any) -> aiohttp.ClientResponse:
        if self._http is None:
            raise RuntimeError("use the Client as `async with Client(...)`")
        try:
            return await self._http.request(method, self.url + path, **kwargs)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise Unreachable(f"cannot reach the service at {self.url}: {exc or type(exc).__name__}") from None


@attrs.define
class _Cursor:
    """Where `follow` is in a job's events, and how its reconnecting goes."""

    last: int
    alive_at: float
    opened: bool = False
    done: bool = False
    failures: int = 0
    retry_s: float = DEFAULT_RETRY_S

    def fresh(self, events: list[Event], now: float) -> list[Event]:
        """The events not seen yet, through the terminal one."""
        batch: list[Event] = []
        for event in events:
            if event.id is not None and event.id <= self.last:
                continue
            batch.append(event)
            self.last = event.id if event.id is not None else self.last
            if event.event in TERMINAL:
                self.done = True
                break
        if batch:
            self.alive_at, self.failures = now, 0
        return batch


async def _raise_for(response: aiohttp.ClientResponse) -> None:
    """A 4xx or 5xx as a ClientError with the envelope's code and message."""
    if response.status < 400:
        return
    try:
        error = (await response.json(content_type=None))["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, TypeError, KeyError, aiohttp.ClientPayloadError):
        code, message = "http_error", f"HTTP {response.status} {response.reason or ''}".strip()
    raise ClientError(response.status, code, message)


def _segment(value: str) -> str:
    return quote(value, safe="")


def _mapping(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ClientError(200, "bad_response", f"expected an object, got {type(data).__name__}")
    return data


def _records(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise ClientError(200, "bad_response", "expected a list of objects")
    return data
