"""The error hierarchy. Handlers raise these; one middleware turns them into the envelope."""

from __future__ import annotations

from typing import ClassVar


class StreamsvcError(Exception):
    """An error a client is told about: HTTP status, a snake_case code, a message."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"
    type: ClassVar[str] = "system_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def envelope(self) -> dict[str, dict[str, str]]:
        return {"error": {"type": self.type, "code": self.code, "message": self.message}}


class UserError(StreamsvcError):
    status = 400
    code = "bad_request"
    type = "user_error"


class BadRequest(UserError):
    pass


class Unauthorized(UserError):
    status = 401
    code = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="streamsvc"'})  # (RFC 6750)


class NotFound(UserError):
    status = 404
    code = "not_found"


class UnknownTool(NotFound):
    code = "unknown_tool"

    def __init__(self, tool_id: str) -> None:
        super().__init__(f"unknown tool: {tool_id!r}")
        self.tool_id = tool_id


class UnknownProject(NotFound):
    code = "unknown_project"

    def __init__(self, project_id: str) -> None:
        super().__init__(f"unknown project: {project_id!r}")
        self.project_id = project_id


class UnknownJob(NotFound):
    code = "unknown_job"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"unknown job: {job_id!r}")
        self.job_id = job_id


class BodyStalled(UserError):
    status = 408
    code = "request_timeout"

    def __init__(self, stall_s: float) -> None:
        super().__init__(f"the request's body stalled: nothing came for {stall_s:g} s")


class Conflict(UserError):
    status = 409
    code = "conflict"


class JobFinished(Conflict):
    code = "job_finished"

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id} has already finished ({status})")


class PastLastEvent(Conflict):
    code = "past_last_event"

    def __init__(self, cursor: int, last: int) -> None:
        super().__init__(f"Last-Event-ID {cursor} is past the job's last event ({last})")


class UnsupportedMediaType(UserError):
    status = 415
    code = "unsupported_media_type"


class QueueFull(UserError):
    status = 429
    code = "queue_full"

    def __init__(self, pending: int, retry_after_s: int) -> None:
        super().__init__(
            f"the queue is full ({pending} jobs waiting); retry in {retry_after_s} s",
            headers={"Retry-After": str(retry_after_s)},
        )


class ShuttingDown(StreamsvcError):
    status = 503
    code = "shutting_down"

    def __init__(self) -> None:
        super().__init__("the service is shutting down", headers={"Retry-After": "5"})


class StorageError(StreamsvcError):
    status = 503
    code = "storage_unavailable"


class ProjectBusy(Conflict):
    code = "project_busy"

    def __init__(self, project_id: str) -> None:
        super().__init__(f"project {project_id!r} has a queued or running job; cancel it or wait until it ends")


class ProjectConfigured(Conflict):
    code = "project_configured"

    def __init__(self, project_id: str) -> None:
        super().__init__(f"project {project_id!r} is configured (a folder under projects.root), not uploaded")


class TooManyUploads(UserError):
    status = 429
    code = "too_many_uploads"

    def __init__(self, active: int, retry_after_s: int) -> None:
        super().__init__(
            f"{active} uploads are being unpacked; retry in {retry_after_s} s",
            headers={"Retry-After": str(retry_after_s)},
        )


class ArchiveRefused(UserError):
    """An uploaded archive that is not unpacked: bad or unsafe (400), or over a limit (413)."""

    code = "bad_archive"


class BadArchive(ArchiveRefused):
    """Not a zip, damaged, empty, encrypted, or packed in a way the service does not unpack."""


class UnsafePath(ArchiveRefused):
    code = "unsafe_path"


class SymlinkEntry(ArchiveRefused):
    code = "symlink_entry"


class SpecialEntry(ArchiveRefused):
    code = "special_entry"


class DuplicateEntry(ArchiveRefused):
    code = "duplicate_entry"


class OverLimit(ArchiveRefused):
    status = 413
    code = "archive_too_large"


class ArchiveTooLarge(OverLimit):
    pass


class TooManyEntries(OverLimit):
    code = "too_many_entries"


class EntryTooLarge(OverLimit):
    code = "entry_too_large"


class RatioTooHigh(OverLimit):
    code = "ratio_too_high"
