"""Projects: configured folders under a root, and uploaded ones under `data_dir/projects`, named by ids
that can never point outside their folder."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from attrs import define

from .config import UploadsConfig
from .errors import ProjectBusy, ProjectConfigured, StorageError, TooManyUploads, UnknownProject
from .models import iso
from .store import JobStore
from .uploads import Unpacked, unpack

log = logging.getLogger(__name__)

MAX_ID_CHARS = 200
#: the ids of uploaded projects (generated, never chosen by a client); a configured folder so named is ignored
UPLOAD_ID = re.compile(r"up-[0-9a-f]{12}")
#: uploads received and unpacked at once; more are refused (429) so a flood cannot fill the disk
MAX_ACTIVE_UPLOADS = 2
UPLOADS_RETRY_AFTER_S = 2
#: how long an unpacking thread may take to notice it was stopped
STOP_BOUND_S = 10.0
#: the sweeper's period is a quarter of `upload_ttl_s`, within these bounds
SWEEP_MIN_S, SWEEP_MAX_S = 0.05, 30.0
#: random ids tried for a new upload before giving up
ID_ATTEMPTS = 10
META = "meta.json"
FILES = "files"


class Projects:
    """Every project a job can run on: the configured ones (each direct, non-hidden subfolder of
    `root`), then the uploaded ones."""

    def __init__(self, root: Path, uploaded: UploadedProjects | None = None) -> None:
        self.root = root
        self.uploaded = uploaded

    def resolve(self, project_id: str) -> Path:
        """The project's folder; `UnknownProject` for anything that is not one, including
        ids that would resolve outside the root (`..`, absolute, a symlink out)."""
        if UPLOAD_ID.fullmatch(project_id):
            if self.uploaded is None:
                raise UnknownProject(project_id)
            return self.uploaded.resolve(project_id)
        if (
            not project_id
            or len(project_id) > MAX_ID_CHARS
            or project_id.startswith(".")
            or not project_id.isprintable()
            or any(c in project_id for c in "/\\\0")
        ):
            raise UnknownProject(project_id[:MAX_ID_CHARS])
        return _folder_in(self.root, project_id, project_id)

    def ids(self) -> list[str]:
        """The configured projects' ids."""
        try:
            entries = sorted(self.root.iterdir())
        except OSError:
            return []
        ids = []
        for entry in entries:
            if UPLOAD_ID.fullmatch(entry.name):
                continue
            try:
                self.resolve(entry.name)
            except UnknownProject:
                continue
            ids.append(entry.name)
        return ids

    def listing(self) -> list[dict[str, Any]]:
        configured = [{"projectId": project_id, "uploaded": False} for project_id in self.ids()]
        return configured + (self.uploaded.listing() if self.uploaded else [])

    async def delete(self, project_id: str) -> dict[str, Any]:
        """Remove an uploaded project (refused while a job of it is queued or running)."""
        if not UPLOAD_ID.fullmatch(project_id) or self.uploaded is None:
            self.resolve(project_id)
            raise ProjectConfigured(project_id)
        return await self.uploaded.delete(project_id)


@define
class Upload:
    """An uploaded project; its owner (`UploadedProjects`) updates `last_used_at`."""

    project_id: str
    file_count: int
    bytes: int
    created_at: float
    #: the upload, or the latest submission or end of a job of it
    last_used_at: float

    def summary(self) -> dict[str, Any]:
        return {"projectId": self.project_id, "fileCount": self.file_count, "bytes": self.bytes}

    def to_json(self, last_used_at: float, busy: bool, ttl_s: float) -> dict[str, Any]:
        """As listed: `expiresAt` is when it goes unless used again, null while a job of it is queued or running."""
        return self.summary() | {
            "uploaded": True,
            "createdAt": iso(self.created_at),
            "lastUsedAt": iso(last_used_at),
            "expiresAt": None if busy else iso(last_used_at + ttl_s),
            "busy": busy,
        }


class UploadedProjects:
    """The uploaded projects: `data_dir/projects/<id>/files` (the project) beside `<id>/meta.json`.

    An upload is unpacked under `data_dir/uploads-tmp` and renamed into place whole; a removal renames it
    back out before deleting it; whatever a crash leaves in `uploads-tmp` is removed at start. Idle
    projects (no job queued or running, none submitted or ended for `upload_ttl_s`) are swept away."""

    def __init__(self, data_dir: Path, limits: UploadsConfig, store: JobStore) -> None:
        self.dir = data_dir / "projects"
        self.tmp_dir = data_dir / "uploads-tmp"
        self.limits = limits
        self.store = store
        self.sweep_s = min(max(limits.upload_ttl_s / 4, SWEEP_MIN_S), SWEEP_MAX_S)
        #: when the last sweep began (for tests: a sweep after a moment has looked at everything up to it)
        self.swept_at = 0.0
        self._index: dict[str, Upload] = {}
        self._active = 0

    @property
    def active(self) -> int:
        """Uploads being received or unpacked now."""
        return self._active

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        try:
            self.tmp_dir.mkdir(parents=True, exist_ok=True)
            self.dir.mkdir(exist_ok=True)
            leftovers, folders = list(self.tmp_dir.iterdir()), sorted(self.dir.iterdir())
        except OSError as exc:  # uploads then fail with 503; jobs on configured projects still run
            log.error("uploaded projects are unavailable: %s", exc)
            return
        for leftover in leftovers:  # what a crash left mid-upload or mid-removal
            _remove(leftover)
        for folder in folders:
            if UPLOAD_ID.fullmatch(folder.name):
                self._adopt(folder)

    def _adopt(self, folder: Path) -> None:
        try:
            meta = json.loads((folder / META).read_bytes())
            upload = Upload(folder.name, meta["fileCount"], meta["bytes"], meta["createdAt"], meta["createdAt"])
            upload.last_used_at = max(upload.created_at, (folder / META).stat().st_mtime)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("removing uploaded project %s: unreadable %s: %s", folder.name, META, exc)
            _remove(folder)
            return
        self._index[upload.project_id] = upload

    def resolve(self, project_id: str) -> Path:
        if project_id not in self._index:
            raise UnknownProject(project_id)
        return _folder_in(_folder_in(self.dir, project_id, project_id), FILES, project_id)

    def listing(self) -> list[dict[str, Any]]:
        usage = self._usage()
        projects = []
        for upload in sorted(self._index.values(), key=lambda upload: upload.created_at):
            last_used_at, busy = usage.get(upload.project_id, (upload.last_used_at, False))
            projects.append(upload.to_json(last_used_at, busy, self.limits.upload_ttl_s))
        return projects

    async def receive(self, write_archive: Callable[[Path], Awaitable[int]]) -> Upload:
        """A new project from an archive `write_archive` writes to the path it is given; refused (and
        nothing left on disk) when the archive is; at most `MAX_ACTIVE_UPLOADS` at once."""
        if self._active >= MAX_ACTIVE_UPLOADS:
            raise TooManyUploads(self._active, UPLOADS_RETRY_AFTER_S)
        project_id = self._new_id()
        self._active += 1
        archive, stage = self.tmp_dir / f"{project_id}.zip", self.tmp_dir / project_id
        try:
            await write_archive(archive)
            upload = await _in_thread(self._stage, archive, stage, project_id)
            os.rename(stage, self.dir / project_id)
        except OSError as exc:
            await _discard(stage)
            raise StorageError(f"cannot store the project: {exc.strerror}") from None
        except BaseException:
            await _discard(stage)
            raise
        finally:
            archive.unlink(missing_ok=True)
            self._active -= 1
        self._index[project_id] = upload
        log.info("project %s uploaded: %d files, %d bytes", project_id, upload.file_count, upload.bytes)
        return upload

    def _stage(self, archive: Path, stage: Path, project_id: str, stop: threading.Event) -> Upload:
        """Unpack `archive` into `stage/files` and describe it in `stage/meta.json` (blocking)."""
        stage.mkdir(mode=0o755)
        try:
            unpacked: Unpacked = unpack(archive, stage / FILES, self.limits, stop)
            upload = Upload(project_id, unpacked.file_count, unpacked.bytes, time.time(), time.time())
            meta = {"projectId": project_id, "fileCount": upload.file_count, "bytes": upload.bytes}
            (stage / META).write_text(json.dumps(meta | {"createdAt": upload.created_at}))
            os.utime(stage / META, (upload.created_at, upload.created_at))  # its time is the last use
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return upload

    async def delete(self, project_id: str) -> dict[str, Any]:
        upload = self._index.get(project_id)
        if upload is None:
            raise UnknownProject(project_id)
        if self._usage().get(project_id, (0.0, False))[1]:
            raise ProjectBusy(project_id)
        await _discard(self._take(project_id))  # no await between the check and the take: no job slips in
        log.info("project %s deleted", project_id)
        return upload.summary()

    async def sweep_forever(self) -> None:
        """Remove idle projects, every `sweep_s` seconds, until cancelled."""
        while True:
            try:
                await self.sweep()
            except Exception:  # a bug must cost one sweep, never the sweeper
                log.exception("sweeping uploaded projects failed")
            await asyncio.sleep(self.sweep_s)

    async def sweep(self) -> None:
        now = self.swept_at = time.time()
        usage = self._usage()
        expired = []
        for upload in list(self._index.values()):
            last_used_at, busy = usage.get(upload.project_id, (upload.last_used_at, False))
            if last_used_at > upload.last_used_at:
                upload.last_used_at = last_used_at
                with contextlib.suppress(OSError):  # only a restart's idea of the last use is at stake
                    os.utime(self.dir / upload.project_id / META, (last_used_at, last_used_at))
            if not busy and now - last_used_at >= self.limits.upload_ttl_s:
                expired.append(self._take(upload.project_id))
                log.info("project %s removed: idle for %.0f s", upload.project_id, now - last_used_at)
        for trash in expired:
            await _discard(trash)

    def _usage(self) -> dict[str, tuple[float, bool]]:
        """Per uploaded project with jobs: when it was last used, and whether a job of it is queued or running."""
        usage: dict[str, tuple[float, bool]] = {}
        for job in self.store.jobs.values():
            upload = self._index.get(job.project_id)
            if upload is None:
                continue
            last_used_at, busy = usage.get(job.project_id, (upload.last_used_at, False))
            last_used_at = max(last_used_at, job.created_at, job.completed_at or 0.0)
            usage[job.project_id] = (last_used_at, busy or not job.status.finished)
        return usage

    def _take(self, project_id: str) -> Path:
        """Move a project out of reach at once (jobs resolve it no more); where it went, to be deleted."""
        trash = self.tmp_dir / f"deleting-{project_id}-{secrets.token_hex(4)}"
        del self._index[project_id]
        try:
            os.rename(self.dir / project_id, trash)
        except OSError as exc:
            log.error("cannot move project %s out for removal: %s", project_id, exc)
        return trash

    def _new_id(self) -> str:
        for _ in range(ID_ATTEMPTS):  # 48 random bits: even one clash is all but impossible
            project_id = f"up-{secrets.token_hex(6)}"
            if project_id not in self._index and not (self.dir / project_id).exists():
                return project_id
        raise StorageError(f"no free project id in {ID_ATTEMPTS} attempts")  # pragma: no cover - 2**-480


def _folder_in(parent: Path, name: str, project_id: str) -> Path:
    """`parent/name` if it is a folder right in `parent` once every symlink is resolved; else `UnknownProject`."""
    try:
        root = _real_folder(parent)
        folder = _real_folder(root / name)
    except (OSError, RuntimeError):
        raise UnknownProject(project_id) from None
    if folder.parent != root:
        raise UnknownProject(project_id)
    return folder


def _real_folder(path: Path) -> Path:
    """The folder `path` leads to, every symlink resolved by the kernel: an open, a
    readlink and two stats, where `Path.resolve` takes an lstat and some Python a part (a
    project is resolved at its job's submit and again at its start: 31 against 66 us).
    OSError if it is no folder."""
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        opened = os.fstat(fd)
    except OSError:  # no /proc
        return path.resolve(strict=True)
    finally:
        os.close(fd)
    if not os.path.samestat(opened, os.stat(real)):  # moved or removed since it was opened
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    return Path(real)


async def _in_thread(work: Callable[..., Upload], *args: Any) -> Upload:
    """`work(*args, stop)` in a thread. When the caller is cancelled, `stop` is set and the thread
    waited for (bounded), so it never outlives the request unnoticed."""
    stop = threading.Event()
    task = asyncio.ensure_future(asyncio.to_thread(work, *args, stop))
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        await asyncio.wait({task})
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait({task}, timeout=STOP_BOUND_S)
        raise
    return task.result()


async def _discard(path: Path) -> None:
    await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)


def _remove(path: Path) -> None:
    """Remove a file or a folder tree, as far as possible (blocking)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
