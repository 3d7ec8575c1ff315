"""Job records and their logs under `data_dir/jobs`: durable, atomic, bounded in number."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import StorageError, UnknownJob
from .joblog import JobLog
from .models import Job, JobStatus

log = logging.getLogger(__name__)

#: finished logs kept open (their index in memory) for quick replay
CACHED_LOGS = 64
LOST_MESSAGE = "the service stopped while the job ran"
#: the most output (in characters) a `complete` event carries, besides `max_result_lines`
MAX_RESULT_BYTES = 1024 * 1024


class JobStore:
    """Every job the service knows, newest last, each with a record file and a log file.

    A record is replaced atomically (written aside, then renamed), so a crash at any
    instant leaves the old record or the new one, never a torn one."""

    def __init__(self, data_dir: Path, retention_jobs: int, max_result_lines: int = 10000) -> None:
        self.dir = data_dir / "jobs"
        self.retention_jobs = retention_jobs
        self.max_result_lines = max_result_lines
        self.jobs: dict[str, Job] = {}
        self._hot: dict[str, JobLog] = {}
        self._cold: OrderedDict[str, JobLog] = OrderedDict()

    def recover(self) -> list[Job]:
        """Load every record; end the jobs a stopped service left running (`lost`) and
        return the accepted, unstarted ones in the order they came, to be run."""
        self.dir.mkdir(parents=True, exist_ok=True)
        loaded = []
        for path in self.dir.glob("*.json.tmp"):
            path.unlink(missing_ok=True)
        for path in self.dir.glob("*.json"):
            try:
                loaded.append(Job.from_record(json.loads(path.read_bytes())))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("skipping unreadable job record %s: %s", path.name, exc)
        loaded.sort(key=lambda job: job.created_at)
        queued = []
        for job in loaded:
            self.jobs[job.job_id] = job
            if job.status is JobStatus.RUNNING:
                self._end_lost(job)
            elif job.status is JobStatus.QUEUED:
                self._hot[job.job_id] = JobLog.load(self._log_path(job.job_id))
                queued.append(job)
        self.prune()
        return queued

    def add(self, tool_id: str, project_id: str, client: str = "") -> Job:
        """Record a newly accepted job, with its empty log."""
        job = Job(job_id=str(uuid.uuid4()), tool_id=tool_id, project_id=project_id, client=client)
        try:
            joblog = JobLog.create(self._log_path(job.job_id))
        except OSError as exc:
            raise StorageError(f"cannot record the job in the data folder: {exc.strerror}") from None
        try:
            self._write(job)
        except OSError as exc:
            joblog.close()
            with contextlib.suppress(OSError):
                self._log_path(job.job_id).unlink(missing_ok=True)
            raise StorageError(f"cannot record the job in the data folder: {exc.strerror}") from None
        self.jobs[job.job_id] = job
        self._hot[job.job_id] = joblog
        return job

    def save(self, job: Job) -> None:
        """Persist the record. A failing data folder is logged, not raised: the record in
        memory stays right and is served."""
        try:
            self._write(job)
        except OSError as exc:
            log.error("cannot save job record %s: %s", job.job_id, exc)

    def finish(self, job: Job, output: Sequence[str]) -> None:
        """A job has ended: save its record, then end its log (a crash between the two
        leaves a log without its end, which loading completes), then apply retention."""
        self.save(job)
        joblog = self.log(job.job_id)
        end_log(joblog, final_events(job, output))
        if self._hot.pop(job.job_id, None) is not None:
            self._remember(job.job_id, joblog)
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
        joblog = await asyncio.to_thread(JobLog.load, self._log_path(job_id))
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
        """Keep the newest `retention_jobs` finished jobs; remove older ones, record and log.
        Queued and running jobs are never removed."""
        finished = [job for job in self.jobs.values() if job.status.finished]
        for job in finished[: max(len(finished) - self.retention_jobs, 0)]:
            del self.jobs[job.job_id]
            self._cold.pop(job.job_id, None)
            for path in (self._record_path(job.job_id), self._log_path(job.job_id)):
                path.unlink(missing_ok=True)

    def close(self) -> None:
        for joblog in self._hot.values():
            joblog.close()

    def _end_lost(self, job: Job) -> None:
        joblog = JobLog.load(self._log_path(job.job_id))
        lines = list(joblog.output_lines())
        job.output_lines, job.output_bytes = len(lines), sum(len(line.encode()) + 1 for line in lines)
        job.transition(JobStatus.LOST, error=LOST_MESSAGE)
        self._repair(job, joblog)
        self._write(job)

    def _repair(self, job: Job, joblog: JobLog) -> None:
        """A finished job's log that lacks its end (the disk failed, or the service died
        between the two writes) gets it now, so that its streams end."""
        if job.status.finished and not joblog.finished:
            tail = list(joblog.output_lines())[-self.max_result_lines :] if self.max_result_lines else []
            end_log(joblog, final_events(job, tail))
            joblog.close()

    def _remember(self, job_id: str, joblog: JobLog) -> None:
        self._cold[job_id] = joblog
        while len(self._cold) > CACHED_LOGS:
            self._cold.popitem(last=False)

    def _write(self, job: Job) -> None:
        path = self._record_path(job.job_id)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(json.dumps(job.to_record()).encode())
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    def _record_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.json"

    def _log_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.log"


def final_events(job: Job, output: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """What ends a finished job's log: its last status, then `complete` (or `error` when
    the service lost it)."""
    status = ("status", {"status": job.status.value, "timestamp": now_ms()})
    if job.status is JobStatus.LOST:
        return [status, ("error", {"message": job.error or LOST_MESSAGE})]
    return [status, ("complete", job.execution_response(_tail_within(output, MAX_RESULT_BYTES)))]


def _tail_within(lines: Sequence[str], max_bytes: int) -> list[str]:
    """The last of `lines` that fit in `max_bytes` (the `complete` event stays small)."""
    kept: list[str] = []
    for line in reversed(lines):
        max_bytes -= len(line) + 1
        if max_bytes < 0:
            break
        kept.append(line)
    return kept[::-1]


def end_log(joblog: JobLog, events: list[tuple[str, dict[str, Any]]]) -> None:
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
