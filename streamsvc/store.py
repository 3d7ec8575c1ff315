"""Job records and their logs under `data_dir/jobs`: durable, atomic, bounded in number."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import StorageError, UnknownJob
from .joblog import EventData, JobLog, json_string
from .models import Job, JobStatus

log = logging.getLogger(__name__)

#: finished logs kept open (their index in memory) for quick replay
CACHED_LOGS = 64
LOST_MESSAGE = "the service stopped while the job ran"
#: the most output a `complete` event carries, besides `max_result_lines`: a line counts its
#: characters and one more, as JSON writes them (a plain line: as many as it has)
MAX_RESULT_BYTES = 1024 * 1024
#: below this much free space, or this many free inodes, in the data folder, new jobs are
#: refused (their log file is made at their first event, and must be)
MIN_FREE_BYTES = 64 * 1024
MIN_FREE_INODES = 16
#: the journal of job records, in `data_dir/jobs`
JOURNAL = "records.jsonl"
#: the file in `data_dir` a running service holds locked, with its pid in it
LOCK_FILE = "streamsvc.lock"
#: the journal is rewritten when it holds more lines than this many per job, plus the slack
COMPACT_FACTOR = 4
COMPACT_SLACK = 1000
#: how long a stopping service waits for a compaction under way (the old journal stays whole)
COMPACT_BOUND_S = 30.0
#: the most records kept for a compaction while its thread writes (~300 bytes each); past
#: them, that compaction is given up and the old journal goes on
COMPACT_BACKLOG = 100_000


class DataFolderInUse(Exception):
    """Another process holds the data folder."""

    def __init__(self, folder: Path, holder: str) -> None:
        super().__init__(f"{folder} is in use by another streamsvc ({holder})")


@contextlib.contextmanager
def data_folder_held(folder: Path) -> Iterator[None]:
    """Hold `folder` for this process while the block runs: `DataFolderInUse` if another
    holds it. A second service on the same data would end the first one's running jobs as
    lost, write into their logs and run its queued jobs again. The lock is the kernel's
    (`flock`), so it goes with the process however it ends; its descriptor is not inherited,
    and is read-only, so that the folder can still be remounted read-only under a running
    service. A read-only folder with no lock file yet is served without one."""
    path = folder / LOCK_FILE
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        log.warning("serving %s without holding it: %s", folder, exc)
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            raise DataFolderInUse(folder, f"pid {holder}" if holder.isdigit() else "its pid unknown") from None
        with contextlib.suppress(OSError):  # (only a name for the message above)
            path.write_text(f"{os.getpid()}\n")
        yield
    finally:
        os.close(fd)  # (the lock with it)


class RecordJournal:
    """An append-only file of JSON records, one per line, one write per record. It keeps
    each job's last record as the line it wrote, so that a compaction writes those lines
    again instead of encoding every job anew (~9 ms of the loop's CPU at 1,000 jobs, ~90
    at 10,000)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines = 0
        #: the file's length up to its last whole line, once known
        self._size: int | None = None
        #: each job's newest record, encoded: what a compaction writes
        self._last: dict[str, bytes] = {}
        #: records whose write failed (a full or failing disk), newest per job, written ahead
        #: of the next record that is; at most one per job the store held when writes failed
        #: (it admits no new job while they fail)
        self._unwritten: dict[str, bytes] = {}
        #: while a compaction writes the new journal aside: the records appended since it began
        self._since: list[bytes] | None = None
        #: the compaction under way outgrew COMPACT_BACKLOG: its new journal will not be used
        self._given_up = False
        self._aside = path.with_name(path.name + ".tmp")
        #: the last compaction finished off the loop, and its thread's write
        self._finishing: asyncio.Task[None] | None = None
        self._writing: asyncio.Future[None] | None = None

    def load(self, folder: Path) -> list[dict[str, Any]]:
        """The last record of each job, in the journal's order; a torn last line is cut
        off. Per-job `<id>.json` files (the layout before the journal) are read first."""
        records: dict[str, dict[str, Any]] = {}
        for path in folder.glob("*.json.tmp"):
            path.unlink(missing_ok=True)
        for path in folder.glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                self._take(records, path.read_bytes())
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            blob = b""
        whole = blob.rfind(b"\n") + 1
        if whole < len(blob):
            with contextlib.suppress(OSError):  # else the next append starts a new line
                os.truncate(self.path, whole)
        for line in blob[:whole].splitlines():
            try:
                self._take(records, line)
            except ValueError as exc:
                log.warning("skipping a damaged line of %s: %s", self.path.name, exc)
        self._last = {job_id: _encode(record) for job_id, record in records.items()}
        return list(records.values())

    @staticmethod
    def _take(records: dict[str, dict[str, Any]], raw: bytes) -> None:
        record = json.loads(raw)
        if not isinstance(record, dict) or not isinstance(record.get("job_id"), str):
            raise ValueError("not a job record")
        records.pop(record["job_id"], None)
        if not record.get("removed"):
            records[record["job_id"]] = record

    def append(self, record: dict[str, Any]) -> None:
        """One line, one write (see `flush`). The record is the job's newest even when the
        write fails: the next write that succeeds, or the next compaction, writes it."""
        job_id = record["job_id"]
        line = _encode(record)
        if record.get("removed"):
            self._last.pop(job_id, None)
        else:
            self._last[job_id] = line
        self._unwritten.pop(job_id, None)  # (an older one of the job is superseded)
        self._unwritten[job_id] = line
        self.flush()

    def forget(self, job_id: str) -> None:
        """Drop the record of a job the store refused because its write failed."""
        self._unwritten.pop(job_id, None)
        self._last.pop(job_id, None)

    def flush(self) -> None:
        """Write the records not yet in the file, in one write; on failure they stay for the
        next, and the file is cut back to its last whole line. The file is open only for
        the write, so no descriptor pins the data folder."""
        if not self._unwritten:
            return
        lines = list(self._unwritten.values())
        blob = b"".join(lines)
        if self._size is None:
            self._size = self._whole_size()
            if self._size < _size_of(self.path):
                blob = b"\n" + blob  # a torn line that could not be cut stays a line of its own
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if os.write(fd, blob) != len(blob):
                raise OSError(errno.ENOSPC, "short write to the job journal")
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._size)
            raise
        finally:
            os.close(fd)
        self._unwritten.clear()
        self._size += len(blob)
        self.lines += len(lines)
        if self._since is not None and not self._given_up:  # a compaction is under way: the new journal gets them too
            self._since += lines
            if len(self._since) > COMPACT_BACKLOG:
                self._given_up = True
                self._since.clear()

    def remove(self, job_id: str) -> None:
        """Record that a job is gone: loading forgets its earlier records."""
        self.append({"job_id": job_id, "removed": True})

    def _whole_size(self) -> int:
        """The length of the file up to its last newline."""
        size = _size_of(self.path)
        if size == 0:
            return 0
        with open(self.path, "rb") as file:
            file.seek(max(size - 64 * 1024, 0))
            tail = file.read()
        return size - len(tail) + tail.rfind(b"\n") + 1

    def compact(self, job_ids: Iterable[str]) -> None:
        """Rewrite the journal to hold exactly the newest record of each of `job_ids`, all
        of which it has seen (aside, synced, then renamed into place: a power loss leaves
        the old journal or the new one, never an empty one), and drop per-job record files
        of the old layout. Other jobs are forgotten. Blocking: for the start."""
        blob, count = self._begin(job_ids)
        try:
            self._write_aside(blob)
        except BaseException:
            self._since = None
            raise
        self._swap(len(blob), count)
        self._settle_folder()

    def compact_off_loop(self, job_ids: Iterable[str]) -> None:
        """`compact`, begun now and finished by a task, which writes and syncs the new
        journal in a thread: a sync can take long on a busy disk, and every stream would
        wait for it. Records appended meanwhile go to the old journal, as always, and are
        added to the new one just before it takes the old one's place. A failure is
        logged; the old journal stays."""
        blob, count = self._begin(job_ids)
        self._finishing = asyncio.get_running_loop().create_task(
            self._finish_off_loop(blob, count), name="journal-compaction"
        )

    @property
    def compacting(self) -> bool:
        """A compaction has begun and its new journal is not yet in place."""
        return self._since is not None

    async def settle(self, timeout_s: float) -> None:
        """Wait, at most `timeout_s`, for a compaction under way, its thread included."""
        pending = {future for future in (self._finishing, self._writing) if future is not None and not future.done()}
        if pending:
            await asyncio.wait(pending, timeout=timeout_s)

    async def _finish_off_loop(self, blob: bytes, count: int) -> None:
        self._writing = writing = asyncio.ensure_future(asyncio.to_thread(self._write_aside, blob))
        try:
            await asyncio.shield(writing)  # cancelled (the service stops), the thread writes on ...
            if self._given_up:
                self._since = None
                self._aside.unlink(missing_ok=True)
                log.warning("job journal compaction given up: %d records came while it wrote", COMPACT_BACKLOG)
                return
            self._swap(len(blob), count)
        except asyncio.CancelledError:
            writing.add_done_callback(self._abandon)  # ... and no other compaction begins before it ends
            raise
        except OSError as exc:  # (the write aside or the swap: the old journal stays)
            self._since = None
            log.error("cannot compact the job journal: %s", exc)
            return
        await asyncio.to_thread(self._settle_folder)

    def _abandon(self, writing: asyncio.Future[None]) -> None:
        self._since = None
        if not writing.cancelled() and writing.exception() is not None:
            log.error("cannot compact the job journal: %s", writing.exception())

    def _begin(self, job_ids: Iterable[str]) -> tuple[bytes, int]:
        """The new journal's content and its number of lines; from now on appends are also
        kept for it, until `_swap`."""
        if self._since is not None:
            raise RuntimeError("a compaction of the job journal is under way")
        self._last = {job_id: self._last[job_id] for job_id in job_ids}
        self._since, self._given_up = [], False
        return b"".join(self._last.values()), len(self._last)

    def _write_aside(self, blob: bytes) -> None:
        """Write the new journal aside and sync it (in any thread: it touches nothing else)."""
        try:
            with open(self._aside, "wb") as out:
                out.write(blob)
                out.flush()
                os.fsync(out.fileno())
        except OSError:
            self._aside.unlink(missing_ok=True)
            raise

    def _settle_folder(self) -> None:
        """Once the new journal is in place: make the rename durable, and drop the per-job
        record files of the old layout."""
        with contextlib.suppress(OSError):
            _sync_folder(self.path.parent)
        for path in self.path.parent.glob("*.json"):
            path.unlink(missing_ok=True)

    def _swap(self, size: int, count: int) -> None:
        """Add the records appended since `_begin` to the new journal, then put it in place."""
        since, self._since = self._since or [], None
        try:
            if since:
                with open(self._aside, "ab") as out:
                    out.write(b"".join(since))
            os.replace(self._aside, self.path)
        except OSError:
            self._aside.unlink(missing_ok=True)
            raise
        self.lines = count + len(since)
        self._size = size + sum(map(len, since))


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class JobStore:
    """Every job the service knows, newest last: its records in one journal, its events in
    a log file of its own.

    Each change of a job appends its whole record as one line to `records.jsonl` (one
    write, no file made per change: a job costs three appends, not three files renamed
    into place). The last line of a job wins; a crash at any instant leaves at most a torn
    last line, which loading cuts off. The journal is rewritten (aside, then renamed) when
    it holds many more lines than jobs."""

    def __init__(
        self,
        data_dir: Path,
        retention_jobs: int,
        max_result_lines: int = 10000,
        tools_result_lines: Mapping[str, int] | None = None,
    ) -> None:
        self.dir = data_dir / "jobs"
        self.retention_jobs = retention_jobs
        #: the lines of output a `complete` event carries: per tool, else max_result_lines
        self.max_result_lines = max_result_lines
        self.tools_result_lines = dict(tools_result_lines or {})
        self.jobs: dict[str, Job] = {}
        #: the finished jobs' ids, oldest first (in the order they finished): retention's queue
        self._finished: dict[str, None] = {}
        self._hot: dict[str, JobLog] = {}
        self._cold: OrderedDict[str, JobLog] = OrderedDict()
        self._journal = RecordJournal(self.dir / JOURNAL)

    def recover(self) -> list[Job]:
        """Load every record; end the jobs a stopped service left running (`lost`) and
        return the accepted, unstarted ones in the order they came, to be run."""
        self.dir.mkdir(parents=True, exist_ok=True)
        loaded = []
        for record in self._journal.load(self.dir):
            try:
                loaded.append(Job.from_record(record))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("skipping an unreadable job record: %s", exc)
        loaded.sort(key=lambda job: job.created_at)
        queued = []
        for job in loaded:
            self.jobs[job.job_id] = job
            if job.status is JobStatus.RUNNING:
                self._end_lost(job)
            elif job.status is JobStatus.QUEUED:
                self._hot[job.job_id] = JobLog.load(self._log_path(job.job_id))
                queued.append(job)
        finished = [job for job in loaded if job.status.finished]
        finished.sort(key=lambda job: job.completed_at or job.created_at)  # retention's order, as before the stop
        self._finished = dict.fromkeys(job.job_id for job in finished)
        self._remove_oldest()
        self._compact()
        return queued

    def add(self, tool_id: str, project_id: str, client: str = "") -> Job:
        """Record a newly accepted job, with its empty log."""
        job = Job(job_id=str(uuid.uuid4()), tool_id=tool_id, project_id=project_id, client=client)
        self._check_space()
        try:
            self._write(job)
        except OSError as exc:
            self._journal.forget(job.job_id)  # refused: never to be written later
            raise StorageError(f"cannot record the job in the data folder: {exc.strerror}") from None
        self.jobs[job.job_id] = job
        self._hot[job.job_id] = JobLog.create(self._log_path(job.job_id))
        return job

    def _check_space(self) -> None:
        """Refuse a job the data folder has no room for: its log could not be written."""
        try:
            info = os.statvfs(self.dir)
        except OSError as exc:
            raise StorageError(f"cannot use the data folder: {exc.strerror}") from None
        free = info.f_bavail * info.f_frsize
        if free < MIN_FREE_BYTES:
            raise StorageError(f"no space left in the data folder ({free} bytes free)")
        if info.f_files and info.f_favail < MIN_FREE_INODES:  # f_files 0: no inode count here
            raise StorageError(f"no room for new files in the data folder ({info.f_favail} inodes free)")

    def save(self, job: Job) -> None:
        """Persist the record. A failing data folder is logged, not raised: the record in
        memory stays right and is served, and is written with the next record that is (or
        when the service stops)."""
        try:
            self._write(job)
        except OSError as exc:
            log.error("cannot save job record %s: %s", job.job_id, exc)

    def finish(self, job: Job, output: Sequence[str]) -> None:
        """A job has ended: save its record, then end its log (a crash between the two
        leaves a log without its end, which loading completes), then apply retention.
        `output`: its last lines, as JSON strings (see `final_events`)."""
        self.save(job)
        joblog = self.log(job.job_id)
        end_log(joblog, final_events(job, output))
        if self._hot.pop(job.job_id, None) is not None:
            self._remember(job.job_id, joblog)
        self._finished[job.job_id] = None
        self.prune()

    def get(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise UnknownJob(job_id) from None

    def log(self, job_id: str) -> JobLog:
        """A job's log, loaded (blocking) if it is neither hot nor cached."""
        return self._cached_log(job_id) or self._adopt(job_id, JobLog.load(self._log_path(job_id)))

    async def open_log(self, job_id: str) -> JobLog:
        """A job's log for a handler: a large file is indexed off the event loop."""
        if cached := self._cached_log(job_id):
            return cached
        try:
            joblog = await asyncio.to_thread(JobLog.load, self._log_path(job_id))
        except OSError as exc:  # a failing disk, or a file that is not one: the envelope says so
            raise StorageError(f"cannot read the job's log: {exc.strerror or exc}") from None
        self.get(job_id)  # it may have been removed meanwhile
        return self._cached_log(job_id) or self._adopt(job_id, joblog)

    def _cached_log(self, job_id: str) -> JobLog | None:
        self.get(job_id)
        if job_id in self._cold:
            self._cold.move_to_end(job_id)
        return self._hot.get(job_id) or self._cold.get(job_id)

    def _adopt(self, job_id: str, joblog: JobLog) -> JobLog:
        self._repair(self.jobs[job_id], joblog)
        self._remember(job_id, joblog)
        return joblog

    def newest(self, status: JobStatus | None = None) -> Iterator[Job]:
        for job in reversed(self.jobs.values()):
            if status is None or job.status is status:
                yield job

    def prune(self) -> None:
        """Keep the `retention_jobs` jobs that finished last; remove older ones, record and
        log. Queued and running jobs are never removed. Compact the journal when it has grown
        long: in the background when the event loop runs, else at once."""
        self._remove_oldest()
        if self._journal.lines <= COMPACT_FACTOR * len(self.jobs) + COMPACT_SLACK or self._journal.compacting:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._compact()
        else:
            self._journal.compact_off_loop(self.jobs)

    async def settle(self) -> None:
        """Wait (bounded) for a compaction under way: the service stops."""
        await self._journal.settle(COMPACT_BOUND_S)

    def _remove_oldest(self) -> None:
        while len(self._finished) > self.retention_jobs:
            job_id = next(iter(self._finished))
            del self._finished[job_id], self.jobs[job_id]
            self._cold.pop(job_id, None)
            try:
                self._log_path(job_id).unlink(missing_ok=True)
            except OSError as exc:  # (a read-only or failing disk) the file stays, unserved
                log.error("cannot remove the log of job %s: %s", job_id, exc)
            try:
                self._journal.remove(job_id)
            except OSError as exc:  # written with the next record that is, or at the stop
                log.error("cannot record the removal of job %s: %s", job_id, exc)

    def _compact(self) -> None:
        try:
            self._journal.compact(self.jobs)
        except OSError as exc:  # the journal stays as it was, longer than needed
            log.error("cannot compact the job journal: %s", exc)

    def close(self) -> None:
        """The service stops: write the records whose writes failed, if the disk now takes them."""
        for joblog in self._hot.values():
            joblog.close()
        try:
            self._journal.flush()
        except OSError as exc:  # their jobs come back at the start as the journal last had them
            log.error("cannot write the last job records: %s", exc)

    def _end_lost(self, job: Job) -> None:
        joblog = JobLog.load(self._log_path(job.job_id))
        lines = list(joblog.output_lines())
        job.output_lines, job.output_bytes = len(lines), sum(len(line.encode()) + 1 for line in lines)
        job.transition(JobStatus.LOST, error=LOST_MESSAGE)
        self._repair(job, joblog)
        self.save(job)  # a read-only data folder still serves the jobs it holds

    def _repair(self, job: Job, joblog: JobLog) -> None:
        """A finished job's log that lacks its end (the disk failed, or the service died
        between the two writes) gets it now, so that its streams end."""
        if job.status.finished and not joblog.finished:
            keep = self.result_lines(job.tool_id)
            tail = list(joblog.output_lines())[-keep:] if keep else []
            end_log(joblog, final_events(job, list(map(json_string, tail))))
            joblog.close()

    def result_lines(self, tool_id: str) -> int:
        """How many of its last output lines a job of `tool_id` ends with (in `complete`)."""
        return self.tools_result_lines.get(tool_id, self.max_result_lines)

    def _remember(self, job_id: str, joblog: JobLog) -> None:
        self._cold[job_id] = joblog
        while len(self._cold) > CACHED_LOGS:
            self._cold.popitem(last=False)

    def _write(self, job: Job) -> None:
        self._journal.append(job.to_record())

    def _log_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.log"


def final_events(job: Job, output: Sequence[str]) -> list[tuple[str, EventData]]:
    """What ends a finished job's log, whatever its status (`lost` too): its last status,
    then `complete`, whose output is the last of `output` (lines as JSON strings, as
    `JobLog.extend_output` returns them) that fit in MAX_RESULT_BYTES. (Logs written
    before 2026-12 end a lost job with `error`.)"""
    status: EventData = {"status": job.status.value, "timestamp": now_ms()}
    return [("status", status), ("complete", job.execution_response_json(_tail_within(output, MAX_RESULT_BYTES)))]


def _tail_within(quoted: Sequence[str], max_bytes: int) -> Sequence[str]:
    """The last of the `quoted` lines that fit in `max_bytes` (the `complete` event stays
    small). A line counts as its JSON string less its quotes, plus one: a line without
    escapes as its characters and a newline, as before the lines came quoted."""
    if sum(map(len, quoted)) - len(quoted) <= max_bytes:
        return quoted  # (the usual case, at a fraction of the loop's cost)
    kept: list[str] = []
    for line in reversed(quoted):
        max_bytes -= len(line) - 1
        if max_bytes < 0:
            break
        kept.append(line)
    return kept[::-1]


def end_log(joblog: JobLog, events: list[tuple[str, EventData]]) -> None:
    """Append a job's final events; if the data folder fails, keep them in memory so that
    the stream still ends as it must."""
    if joblog.finished:
        return  # it ended already (the record was saved first and a crash came between)
    try:
        joblog.extend(events)
    except OSError as exc:
        log.error("cannot write the end of %s: %s", joblog.path.name, exc)
        joblog.extend(events, durable=False)


def now_ms() -> int:
    return time.time_ns() // 1_000_000
