"""Confinement of a tool's process tree: resource limits, an unprivileged user, cgroups.

Resource limits (`setrlimit`) bind each process. Where the host lets the service create
cgroup-v1 groups (as root on most Linux hosts), every job also gets its own `pids` group
(a process limit that holds for root too, and a list of every process of the job, even
one that escaped its process group with `setsid`) and its own `memory` group (a memory
limit for the whole tree).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import resource
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from attrs import define

from .config import Limits

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("pids", "memory")


@define
class Sandbox:
    """The host's means of confinement, found once at start-up."""

    #: per controller, the folder this service's job groups are created in
    cgroup_parents: dict[str, Path]
    #: (uid, gid) tools run as, or None to keep the service's user
    user: tuple[int, int] | None
    #: the watchdog that empties the groups if the service dies, and our end of its pipe
    _reaper: subprocess.Popen[bytes] | None = None
    _lifeline: int | None = None

    @classmethod
    def detect(cls, run_as: str) -> Sandbox:
        user = None
        if run_as and os.geteuid() == 0:
            entry = pwd.getpwnam(run_as)
            user = (entry.pw_uid, entry.pw_gid)
        parents = {}
        for controller in CONTROLLERS:
            parent = _make_parent(controller)
            if parent is not None:
                parents[controller] = parent
        if os.geteuid() == 0 and "pids" not in parents and user is None:
            log.warning("running as root without a pids cgroup: max_processes cannot bind")
        sandbox = cls(parents, user)
        if parents:
            sandbox._start_reaper()
        return sandbox

    def _start_reaper(self) -> None:
        read_end, self._lifeline = os.pipe()
        folders = [str(parent) for parent in self.cgroup_parents.values()]
        try:
            self._reaper = subprocess.Popen(
                [sys.executable, "-m", "streamsvc.reaper", *folders], stdin=read_end, start_new_session=True
            )
        finally:
            os.close(read_end)

    def jail(self, limits: Limits) -> Jail:
        name = uuid.uuid4().hex
        groups: dict[str, Path] = {}
        for controller, parent in self.cgroup_parents.items():
            group = parent / name
            try:
                group.mkdir()
                if controller == "pids":
                    (group / "pids.max").write_text(str(limits.max_processes))
                else:
                    (group / "memory.limit_in_bytes").write_text(str(limits.max_memory_bytes))
            except OSError as exc:
                log.warning("cgroup %s unavailable for a job: %s", group, exc)
                _remove_group(group)
                continue
            groups[controller] = group
        return Jail(groups, limits, self.user)

    def close(self) -> None:
        for parent in self.cgroup_parents.values():
            empty_parent(parent)
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        if self._reaper is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._reaper.wait(timeout=5)
            self._reaper = None


class Jail:
    """One job's confinement: applied in the child before exec, emptied when the job ends."""

    def __init__(self, groups: dict[str, Path], limits: Limits, user: tuple[int, int] | None) -> None:
        self.groups = groups
        self.limits = limits
        self.user = user

    def preexec(self) -> None:
        """Runs in the forked child, before exec: join the groups, set limits, drop root."""
        for group in self.groups.values():
            with open(group / "cgroup.procs", "w") as procs:
                procs.write(str(os.getpid()))
        limits = self.limits
        _limit(resource.RLIMIT_CPU, limits.max_cpu_s)
        _limit(resource.RLIMIT_FSIZE, limits.max_file_bytes)
        _limit(resource.RLIMIT_NPROC, limits.max_processes)
        _limit(resource.RLIMIT_CORE, 0)
        if "memory" not in self.groups:
            _limit(resource.RLIMIT_AS, limits.max_memory_bytes)
        if self.user is not None:
            uid, gid = self.user
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)

    def kill_all(self) -> None:
        """SIGKILL every process of the job that is still in its groups."""
        for group in self.groups.values():
            _kill_group(group)

    def out_of_memory(self) -> bool:
        group = self.groups.get("memory")
        if group is None:
            return False
        with contextlib.suppress(OSError, ValueError):
            return int((group / "memory.failcnt").read_text()) > 0
        return False

    def remove(self) -> None:
        for group in self.groups.values():
            _remove_group(group)


def _limit(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    if which == resource.RLIMIT_CPU:  # SIGXCPU at the soft limit, SIGKILL a second later
        resource.setrlimit(which, (value, value + 1 if hard == resource.RLIM_INFINITY else hard))
    else:
        resource.setrlimit(which, (value, value))


def _own_path(controller: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, names, path = line.split(":", 2)
            if controller in names.split(","):
                return path.lstrip("/")
    return ""


def _make_parent(controller: str) -> Path | None:
    base = CGROUP_ROOT / controller / _own_path(controller)
    if not (base / "cgroup.procs").exists():
        return None
    _reap_stale(base)
    parent = base / f"streamsvc-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir()
    except OSError:
        return None
    return parent


def _reap_stale(base: Path) -> None:
    """Kill what a dead service's jobs left behind, should its reaper have died too."""
    for parent in base.glob("streamsvc-*"):
        with contextlib.suppress(ValueError, IndexError):
            if not _alive(int(parent.name.split("-")[1])):
                empty_parent(parent)


def empty_parent(parent: Path) -> None:
    """Kill every process in a service's job groups, then remove the groups and `parent`."""
    with contextlib.suppress(OSError):
        for group in parent.iterdir():
            if group.is_dir():
                for _ in range(50):  # SIGKILL lands quickly; bounded all the same
                    _kill_group(group)
                    _remove_group(group)
                    if not group.exists():
                        break
                    time.sleep(0.01)
    _remove_group(parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_group(group: Path) -> None:
    with contextlib.suppress(OSError):
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _remove_group(group: Path) -> None:
    with contextlib.suppress(OSError):
        group.rmdir()
