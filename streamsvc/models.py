"""Jobs: their states, the one mutable record per job, and its JSON forms."""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
from attrs import define, field


class JobStatus(str, enum.Enum):
    QUEUED = "queued"  #: accepted, waiting for a worker
    RUNNING = "running"  #: the tool's process is alive
    COMPLETED = "completed"  #: the tool exited with status 0
    FAILED = "failed"  #: any other end of the tool (exit status, signal, output cap, spawn error)
    TIMEOUT = "timeout"  #: killed after its timeout
    CANCELLED = "cancelled"  #: cancelled by a client, queued or running
    LOST = "lost"  #: the service stopped while the job ran

    @property
    def finished(self) -> bool:
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


_ALLOWED = {
    JobStatus.QUEUED: {JobStatus.RUNNING, JobStatus.CANCELLED},
    JobStatus.RUNNING: {
        JobStatus.COMPLETED,
        JobStatus.FAILED,
        JobStatus.TIMEOUT,
        JobStatus.CANCELLED,
        JobStatus.LOST,
    },
}


_EXECUTION_FIELDS = (
    "jobId",
    "toolId",
    "projectId",
    "status",
    "exitCode",
    "signal",
    "error",
    "startedAt",
    "completedAt",
    "durationMs",
    "truncated",
    "outputLines",
)


class IllegalTransition(Exception):
    pass


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@define
class Job:
    """One job's record. Only its owner (the pool) changes it, through `transition`."""

    job_id: str
    tool_id: str
    project_id: str
    created_at: float = field(factory=time.time)
    status: JobStatus = JobStatus.QUEUED
    started_at: float | None = None
    completed_at: float | None = None
    exit_code: int | None = None
    signal: str | None = None
    output_lines: int = 0
    output_bytes: int = 0
    truncated: bool = False
    error: str | None = None
    #: the submitting client's address (for per-client limits; never served)
    client: str = ""

    def transition(self, new: JobStatus, *, error: str | None = None) -> None:
        if new not in _ALLOWED.get(self.status, ()):
            raise IllegalTransition(f"{self.job_id}: {self.status.value} -> {new.value}")
        now = time.time()
        if new is JobStatus.RUNNING:
            self.started_at = now
        else:
            self.completed_at = now
            self.error = error
        self.status = new

    @property
    def duration_ms(self) -> int | None:
        if self.started_at is None:
            return None
        end = self.completed_at if self.completed_at is not None else time.time()
        return round((end - self.started_at) * 1000)

    def to_json(self, queue_position: int | None = None, wait_ms: int | None = None) -> dict[str, Any]:
        return {
            "jobId": self.job_id,
            "toolId": self.tool_id,
            "projectId": self.project_id,
            "status": self.status.value,
            "createdAt": iso(self.created_at),
            "startedAt": iso(self.started_at),
            "completedAt": iso(self.completed_at),
            "exitCode": self.exit_code,
            "signal": self.signal,
            "durationMs": self.duration_ms,
            "outputLines": self.output_lines,
            "outputBytes": self.output_bytes,
            "truncated": self.truncated,
            "error": self.error,
            "queuePosition": queue_position,
            "estimatedWaitMs": wait_ms,
        }

    def execution_response(self, output: Sequence[str]) -> dict[str, Any]:
        """The `complete` event's data: the origin design's result, and more."""
        body = self.to_json()
        keep = _EXECUTION_FIELDS
        return {key: body[key] for key in keep} | {"output": list(output)}

    def execution_response_json(self, quoted_output: Sequence[str]) -> str:
        """`execution_response` as JSON text, its output given as JSON strings already
        (`joblog.json_string`): they are joined, not escaped again. A `complete` event with
        2,000 lines of output is then built and encoded in ~125 µs instead of ~700."""
        text = json.dumps(self.execution_response(()), ensure_ascii=False, separators=(",", ":"))
        return f"{text.removesuffix(']}')}{','.join(quoted_output)}]}}"  # (the output is its last field)

    def to_record(self) -> dict[str, Any]:
        """The on-disk form: every field, times at full precision."""
        return attrs.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        return cls(**(record | {"status": JobStatus(record["status"])}))
