"""A job's event log: the single source of truth for everything a subscriber sees.

Events are numbered 1..n and stored as ready-to-send SSE frames, encoded once. The
bytes go to a file (the durable log) and the newest stay in a bounded in-memory window,
so a subscriber's cursor is just a sequence number: replay, resume, fan-out and a slow
subscriber catching up are the same read, `frames_after(seq)`, answered from memory
when the bytes are still there and from the file otherwise.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from json.encoder import encode_basestring as _json_string
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: a reader following a log: called with the frames just appended and the number before them
Watcher = Callable[[bytes, int], None]
#: an event's data: a dict, or its JSON text when that is built already (a `complete` event)
EventData = dict[str, Any] | str

#: event kinds that end a job's stream
TERMINAL = frozenset({"complete", "error"})

#: bytes of the newest frames kept in memory per log (older ones are read from the file)
MEMORY_WINDOW_BYTES = 4 * 1024 * 1024
#: how much of a log file is read at once when it is loaded
LOAD_CHUNK_BYTES = 1024 * 1024


def encode_frame(seq: int, kind: str, data: EventData) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"id: {seq}\nevent: {kind}\ndata: {payload}\n\n".encode()


def json_string(line: str) -> str:
    """`line` as a JSON string literal, as `json.dumps(line, ensure_ascii=False)` writes it."""
    return _json_string(line)


def encode_output(seq: int, stream: str, quoted: str, timestamp: int) -> bytes:
    """`encode_frame(seq, "output", {"line", "stream", "timestamp", "seq"})`, byte for byte,
    at a fifth of the cost, from the line already quoted (`json_string`); the rest is a
    template (`stream` is "stdout" or "stderr"). The hot path: one call per line."""
    return (
        f'id: {seq}\nevent: output\ndata: {{"line":{quoted},"stream":"{stream}",'
        f'"timestamp":{timestamp},"seq":{seq}}}\n\n'
    ).encode()


def parse_frames(blob: bytes) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(seq, kind, data) of every complete frame in `blob`, which holds whole frames."""
    for frame in blob.split(b"\n\n"):
        if not frame:
            continue
        try:
            fields = dict(line.split(": ", 1) for line in frame.decode().split("\n"))
            yield int(fields["id"]), fields["event"], json.loads(fields["data"])
        except (ValueError, KeyError):  # a damaged frame is skipped, never fatal
            continue


class EventLog(Protocol):
    """What a stream needs from a job's log; Redis Streams can implement it too."""

    @property
    def last_seq(self) -> int: ...

    @property
    def finished(self) -> bool: ...

    def frames_after(self, seq: int, max_bytes: int) -> tuple[bytes, int]: ...

    def watch(self, callback: Watcher) -> None: ...

    def unwatch(self, callback: Watcher) -> None: ...


class JobLog:
    """The in-process `EventLog`: an append-only file plus a window of it in memory."""

    def __init__(self, path: Path, ends: array[int], finished: bool) -> None:
        self.path = path
        #: ends[i] is the file offset just past frame i (ends[0] == 0)
        self._ends = ends
        self._window = bytearray()
        self._window_start = ends[-1]
        #: the file's length: frames past it live only in memory (the disk failed)
        self._durable_end = ends[-1]
        self._finished = finished
        self._fd: int | None = None
        #: the readers following the log, each called after every append (a dict keeps their order)
        self._watchers: dict[Watcher, None] = {}

    @classmethod
    def create(cls, path: Path) -> JobLog:
        """A new, empty log at `path`. The file is made (an existing one replaced) at the
        first write: a queued job costs no file and holds no descriptor."""
        return cls(path, array("q", [0]), finished=False)

    @classmethod
    def load(cls, path: Path) -> JobLog:
        """Index a log's file, reading it in bounded chunks; a torn last frame (a crash
        mid-write) is cut off. Blocking: call it off the event loop for a large log."""
        ends = array("q", [0])
        last_head = b""
        offset = 0  # file offset of `pending`
        pending = b""  # bytes after the last whole frame
        try:
            file = open(path, "rb")  # noqa: SIM115 - closed below; the except must not cover the loop
        except FileNotFoundError:
            return cls(path, ends, finished=False)
        with file:
            while chunk := file.read(LOAD_CHUNK_BYTES):
                blob = pending + chunk
                start = 0
                while (stop := blob.find(b"\n\n", start)) != -1:
                    ends.append(offset + stop + 2)
                    last_head = blob[start : min(stop, start + 64)]
                    start = stop + 2
                pending = blob[start:]
                offset += start
        if pending:
            try:
                os.truncate(path, offset)
            except OSError as exc:  # a read-only data folder: the log is still served as it is
                log.warning("cannot cut the torn end off %s: %s", path.name, exc)
        kind = last_head.partition(b"\nevent: ")[2].partition(b"\n")[0].decode()
        return cls(path, ends, finished=kind in TERMINAL)

    @property
    def last_seq(self) -> int:
        return len(self._ends) - 1

    @property
    def finished(self) -> bool:
        return self._finished

    def append(self, kind: str, data: EventData) -> int:
        self.extend([(kind, data)])
        return self.last_seq

    def extend(self, events: Iterable[tuple[str, EventData]], *, durable: bool = True) -> None:
        """Number, encode and store a batch of events with one write. If the write fails,
        the file is cut back to its last whole frame and OSError is raised, nothing stored.
        `durable=False` keeps the events in memory only (the file can no longer be written,
        but the job's end must still reach its subscribers)."""
        seq = self.last_seq
        frames = []
        terminal = False
        for kind, data in events:
            seq += 1
            numbered = data | {"seq": seq} if kind == "output" and isinstance(data, dict) else data
            frames.append(encode_frame(seq, kind, numbered))
            terminal = terminal or kind in TERMINAL
        self._store(frames, terminal, durable)

    def extend_output(self, stream: str, lines: Sequence[str], timestamp: int) -> list[str]:
        """Store a batch of output lines of one stream ("stdout" or "stderr") as `output`
        events; return the lines as the JSON strings they were stored as (what a `complete`
        event's output is made of, without escaping them again)."""
        quoted = list(map(_json_string, lines))
        first = self.last_seq + 1
        frames = [encode_output(seq, stream, line, timestamp) for seq, line in enumerate(quoted, first)]
        self._store(frames, terminal=False, durable=True)
        return quoted

    def _store(self, frames: list[bytes], terminal: bool, durable: bool) -> None:
        if self._finished:
            raise RuntimeError(f"{self.path.name}: the log has ended")
        if durable and self._fd is None:  # opened at the first write: a queued job holds no fd
            fresh = os.O_TRUNC if self._durable_end == 0 else 0  # nothing of ours is in it yet
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | fresh, 0o644)
        start = self._ends[-1]
        blob = frames[0] if len(frames) == 1 else b"".join(frames)
        if durable and self._fd is not None:
            try:
                _write_all(self._fd, blob)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._durable_end)
                raise
            self._durable_end = start + len(blob)
        ends = itertools.accumulate(map(len, frames), initial=start)
        next(ends)  # `start` itself, the end of the last frame stored
        self._ends.extend(ends)
        self._remember(blob)
        if terminal:
            self._finish()
        self._wake(blob, len(self._ends) - 1 - len(frames))

    def frames_after(self, seq: int, max_bytes: int) -> tuple[bytes, int]:
        """The frames after `seq`, at most about `max_bytes` (at least one), and the new cursor."""
        if seq >= self.last_seq:
            return b"", seq
        seq = max(seq, 0)
        start = self._ends[seq]
        upto = bisect.bisect_right(self._ends, start + max_bytes, lo=seq + 1) - 1
        upto = min(max(upto, seq + 1), self.last_seq)
        return self._bytes(start, self._ends[upto]), upto

    def _bytes(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of the log: from the file, then from the in-memory window."""
        window_start = self._window_start
        head = b""
        if start < window_start:
            with open(self.path, "rb") as file:
                file.seek(start)
                head = file.read(min(stop, window_start) - start)
        if stop <= window_start:
            return head
        return head + bytes(self._window[max(start - window_start, 0) : stop - window_start])

    def watch(self, callback: Watcher) -> None:
        """Call `callback(frames, after)` after every append, until `unwatch(callback)`:
        the appended frames, and the number of the event before the first of them (a reader
        whose cursor is `after` lacks exactly `frames`). It runs inside the append, so it
        must be quick; one that raises is logged and called no more."""
        self._watchers[callback] = None

    def unwatch(self, callback: Watcher) -> None:
        self._watchers.pop(callback, None)

    def output_lines(self) -> Iterator[str]:
        """Every output line in order (for the plain-text log)."""
        for _, kind, data in self.events():
            if kind == "output":
                yield data["line"]

    def events(self) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """Every event, parsed back from its frame, in order."""
        for batch in self.event_batches():
            yield from batch

    def event_batches(self, max_bytes: int = 256 * 1024) -> Iterator[list[tuple[int, str, dict[str, Any]]]]:
        """The events the log holds now, parsed, in batches of about `max_bytes` of frames."""
        seq, last = 0, self.last_seq
        while seq < last:
            blob, seq = self.frames_after(seq, max_bytes)
            yield list(parse_frames(blob))

    def close(self) -> None:
        """Release the file (the job is over or the service stops); readers stay served,
        from the file and from memory for what the file could not take."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        cut = self._durable_end - self._window_start
        if cut > 0:
            del self._window[:cut]
            self._window_start = self._durable_end

    def _remember(self, blob: bytes) -> None:
        self._window += blob
        excess = len(self._window) - MEMORY_WINDOW_BYTES
        if excess > 0:
            drop = excess + MEMORY_WINDOW_BYTES // 2
            del self._window[:drop]
            self._window_start += drop

    def _finish(self) -> None:
        self._finished = True
        self.close()

    def _wake(self, frames: bytes, after: int) -> None:
        for watcher in list(self._watchers):  # a copy: a watcher may unwatch itself
            try:
                watcher(frames, after)
            except Exception:  # the append has happened: a faulty reader loses its own wake-ups only
                log.exception("%s: a reader's call failed; it is no longer called", self.path.name)
                self.unwatch(watcher)


def _write_all(fd: int, blob: bytes) -> None:
    written = os.write(fd, blob)  # almost always all of it: a file is not a socket
    if written < len(blob):
        view = memoryview(blob)[written:]
        while view:
            view = view[os.write(fd, view) :]
