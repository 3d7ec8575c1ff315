"""Confinement of a tool's process tree: resource limits, an unprivileged user, cgroups.

Resource limits (`setrlimit`) bind each process. Where the host lets the service create
cgroup-v1 groups (as root on most Linux hosts), every job also gets its own `pids` group
(a process limit that holds for root too, and a list of every process of the job, even
one that escaped its process group with `setsid`) and its own `memory` group (a memory
limit for the whole tree).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import pwd
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from attrs import Factory, define, field

from .config import Limits

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("pids", "memory")
#: per controller, the file of a job group's limit
LIMIT_FILES = {"pids": "pids.max", "memory": "memory.limit_in_bytes"}
#: what one read of a cgroup file asks for
CGROUP_READ_BYTES = 64 * 1024
#: at most this many emptied jobs' groups are kept for reuse
MAX_SPARE_JAILS = 64
#: a memory group still charged with more than this (page cache of files its job wrote or
#: read first: reclaimable) is removed, not reused; one charged with any tmpfs or shared
#: memory (not reclaimable without swap) is removed too
MAX_SPARE_CHARGE_BYTES = 4 * 1024 * 1024


#: at most this many empty homes are kept for reuse
MAX_SPARE_HOMES = 256


class Homes:
    """Home folders for jobs (HOME is a fresh, private, empty folder for every job).

    Homes live in a folder of the service's own (mode 0711: the tools' user may enter its
    home, no one else may list or add anything). A home that a job left exactly as it was
    handed over (a real folder of the tools' user, mode 0700, empty, no extended attributes
    or ACLs), and that no process of the job can still reach, is handed to a later job
    instead of being removed and made again: on ext4 that pair of journaled operations
    costs ~90 us a job, a look at the folder ~5 us. Anything else is removed."""

    def __init__(self, user: tuple[int, int] | None) -> None:
        self.user = user
        self._parent: Path | None = None
        self._spare: list[Path] = []

    def take(self) -> Path:
        """An empty home for a job (OSError when none can be made)."""
        while self._spare:
            home = self._spare.pop()
            if self._untouched(home):  # looked at again: it may have idled a long time
                return home
            shutil.rmtree(home, ignore_errors=True)
        try:
            home = Path(tempfile.mkdtemp(prefix="home-", dir=self._made_parent()))
        except FileNotFoundError:  # the folder went (a cleaner of /tmp): a new one
            self._parent = None
            home = Path(tempfile.mkdtemp(prefix="home-", dir=self._made_parent()))
        if self.user is not None:
            try:
                os.chown(home, *self.user)
            except OSError:
                os.rmdir(home)
                raise
        return home

    def _made_parent(self) -> Path:
        if self._parent is None:
            self._parent = Path(tempfile.mkdtemp(prefix="streamsvc-homes-"))
            os.chmod(self._parent, 0o711)
        return self._parent

    async def give_back(self, home: Path, reusable: bool) -> None:
        """Keep `home` for a later job if `reusable` (no process of its job is left) and it
        is as it was handed over; else remove it (at once when that is one syscall, else
        off the loop)."""
        if reusable and len(self._spare) < MAX_SPARE_HOMES and self._untouched(home):
            self._spare.append(home)
            return
        try:
            os.rmdir(home)  # one syscall: not worth a thread
        except OSError:
            await asyncio.to_thread(shutil.rmtree, home, ignore_errors=True)

    def _untouched(self, home: Path) -> bool:
        try:
            info = os.lstat(home)
            owner = self.user[0] if self.user is not None else os.geteuid()
            return (
                stat.S_ISDIR(info.st_mode)
                and stat.S_IMODE(info.st_mode) == 0o700
                and info.st_uid == owner
                and not os.listdir(home)
                and not os.listxattr(home, follow_symlinks=False)
            )
        except OSError:
            return False

    def close(self) -> None:
        for home in self._spare:
            with contextlib.suppress(OSError):
                os.rmdir(home)
        self._spare.clear()
        if self._parent is not None:
            with contextlib.suppress(OSError):
                os.rmdir(self._parent)


@define
class Sandbox:
    """The host's means of confinement, found once at start-up."""

    #: per controller, the folder this service's job groups are created in
    cgroup_parents: dict[str, Path]
    #: (uid, gid) tools run as, or None to keep the service's user
    user: tuple[int, int] | None
    #: the exec shim that sets a tool's rlimits (built from confine.c), or None
    shim: Path | None = None
    #: the jobs' home folders
    homes: Homes = field(default=Factory(lambda self: Homes(self.user), takes_self=True))
    #: the watchdog that empties the groups if the service dies, and our end of its pipe
    _reaper: subprocess.Popen[bytes] | None = None
    _lifeline: int | None = None
    #: emptied jobs' groups, handed to later jobs
    _spare_jails: list[Jail] = Factory(list)

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
        sandbox = cls(parents, user, _build_shim() if "pids" in parents else None)
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

    @property
    def reuses_groups(self) -> bool:
        """Whether an emptied job's groups are handed to a later job (made and removed, a
        pair costs ~0.27 ms of CPU a job; looked at and reset, ~0.05 ms). Only when tools
        run as a user other than root (`run_as`): a root tool can rewrite its own group's
        settings (its limits, the OOM killer), and they would outlive its job."""
        return self.user is not None and self.user[0] != 0

    def jail(self, limits: Limits) -> Jail:
        """A job's confinement: the groups of an earlier job if one is spare and takes
        `limits`, else new ones."""
        while self._spare_jails:
            jail = self._spare_jails.pop()
            if jail.bind(limits):
                return jail
            jail.remove()  # gone, or refused the limits: new groups instead
        name = uuid.uuid4().hex
        groups: dict[str, Path] = {}
        for controller, parent in self.cgroup_parents.items():
            try:
                (parent / name).mkdir()
            except OSError as exc:
                log.warning("cgroup %s unavailable for a job: %s", parent / name, exc)
                continue
            groups[controller] = parent / name
        jail = Jail(groups, self.user, self.shim)
        jail.bind(limits)  # a group that refuses its limit is left out: the job runs without it
        return jail

    def release(self, jail: Jail) -> bool:
        """Once no process is left in `jail`'s groups, keep them for a later job (see
        `reuses_groups`; at most MAX_SPARE_JAILS) or remove them. Whether they were empty."""
        if not all(map(_empty_group, jail.groups.values())):
            return False
        whole = bool(jail.groups) and jail.groups.keys() == self.cgroup_parents.keys()
        if self.reuses_groups and whole and len(self._spare_jails) < MAX_SPARE_JAILS and jail.renew():
            self._spare_jails.append(jail)
            return True
        return jail.remove()

    def close(self) -> None:
        self._spare_jails.clear()
        self.homes.close()
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
    """One job's confinement: its process started inside it, emptied when the job ends."""

    def __init__(self, groups: dict[str, Path], user: tuple[int, int] | None, shim: Path | None) -> None:
        self.groups = groups
        self.user = user
        self.shim = shim
        self.limits = Limits()
        #: the memory group's count of OOM kills when the job started
        self._oom_kills: int | None = None

    def bind(self, limits: Limits) -> bool:
        """Write `limits` into the groups, every time (this also proves the groups are
        there). Whether every group took its limit; one that did not is removed from the jail."""
        self.limits = limits
        wanted = {"pids": limits.max_processes, "memory": limits.max_memory_bytes}
        took = True
        for controller, group in list(self.groups.items()):
            try:
                _write(group / LIMIT_FILES[controller], str(wanted[controller]))
            except OSError as exc:
                log.warning("cgroup %s unavailable for a job: %s", group, exc)
                _remove_group(group)
                del self.groups[controller]
                took = False
        self._oom_kills = self._count_oom_kills()
        return took

    def renew(self) -> bool:
        """Whether the emptied groups can go to another job: none of this job's processes
        still counted against the process limit (a killed tool's children stay counted
        until their new parent reaps them), and little memory still charged to the memory
        group, none of it tmpfs or shared memory. Memory failures then count from zero."""
        try:
            if "pids" in self.groups and _read(self.groups["pids"] / "pids.current").strip() != b"0":
                return False
            if "memory" in self.groups:
                memory = self.groups["memory"]
                if int(_read(memory / "memory.usage_in_bytes")) > MAX_SPARE_CHARGE_BYTES:
                    return False
                if _field(_read(memory / "memory.stat"), b"total_shmem") != 0:
                    return False
                _write(memory / "memory.failcnt", "0")
        except (OSError, ValueError):
            return False
        return True

    def _count_oom_kills(self) -> int | None:
        """The memory group's count of processes the kernel killed for memory (None
        without a memory group, or on kernels before 4.13 that do not count)."""
        group = self.groups.get("memory")
        if group is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            return _field(_read(group / "memory.oom_control"), b"oom_kill")
        return None

    def start(self, argv: Sequence[str], cwd: Path, env: dict[str, str], **options: Any) -> subprocess.Popen[bytes]:
        """`subprocess.Popen(argv, ...)`, confined. With a pids group and the exec shim, the
        child is spawned by vfork (no copy of the service: ~10x the spawn rate of a fork
        that runs Python in the child): the shim joins the job's groups through their
        `cgroup.procs` files, opened here and handed over, and sets the rlimits, before it
        becomes the tool. Otherwise a forked child confines itself."""
        if "pids" not in self.groups or self.shim is None:
            confine = self._confine_self
            return subprocess.Popen(argv, cwd=cwd, env=env, preexec_fn=confine, **options)  # noqa: PLW1509
        program = _find_program(argv[0], cwd, env.get("PATH", ""))
        limits = [f"{which}:{_rlim(soft)}:{_rlim(hard)}" for which, (soft, hard) in self._rlimits()]
        # the shim drops root itself: IDs changed by Popen would make it fork the service
        user = [f"user:{self.user[0]}:{self.user[1]}"] if self.user is not None else []
        procs: list[int] = []
        try:
            for group in self.groups.values():
                procs.append(_open_above_stdio(group / "cgroup.procs"))
            joins = [f"cgroup:{fd}" for fd in procs]
            shim = [str(self.shim), *joins, *user, *limits, "--", program, *argv]
            return subprocess.Popen(shim, cwd=cwd, env=env, pass_fds=procs, **options)
        finally:
            for fd in procs:
                os.close(fd)

    def _rlimits(self) -> list[tuple[int, tuple[int, int]]]:
        limits = self.limits
        wanted = [
            (resource.RLIMIT_CPU, limits.max_cpu_s),
            (resource.RLIMIT_FSIZE, limits.max_file_bytes),
            (resource.RLIMIT_NPROC, limits.max_processes),
            (resource.RLIMIT_CORE, 0),
        ]
        if "memory" not in self.groups:
            wanted.append((resource.RLIMIT_AS, limits.max_memory_bytes))
        return [(which, _bounded(which, value)) for which, value in wanted]

    def _confine_self(self) -> None:
        """Runs in the forked child, before exec: join the groups, set limits, become a batch
        process, drop root."""
        for group in self.groups.values():
            with open(group / "cgroup.procs", "w") as procs:
                procs.write(str(os.getpid()))
        for which, value in self._rlimits():
            resource.setrlimit(which, value)
        with contextlib.suppress(OSError):  # as the shim does: see confine.c
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
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
        """Whether the kernel killed a process of the job for its memory limit (where it
        does not count such kills: whether the job hit its limit at all)."""
        group = self.groups.get("memory")
        if group is None:
            return False
        before, now = self._oom_kills, self._count_oom_kills()
        if before is not None and now is not None:
            return now > before
        with contextlib.suppress(OSError, ValueError):
            return int(_read(group / "memory.failcnt")) > 0
        return False

    def remove(self) -> bool:
        """Remove the job's groups; whether they are all gone (a group that still holds a
        process stays)."""
        results = [_remove_group(group) for group in self.groups.values()]  # every group, even after a failure
        return all(results)


def _open_above_stdio(path: Path) -> int:
    """`path` opened for writing as a descriptor above 2: handed to a child, one of 0-2
    (were the service started with a standard stream closed) would become its stdin,
    stdout or stderr instead."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def _bounded(which: int, value: int) -> tuple[int, int]:
    """(soft, hard) for `value`, within the service's own hard limit."""
    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    if which == resource.RLIMIT_CPU:  # SIGXCPU at the soft limit, SIGKILL a second later
        return value, value + 1 if hard == resource.RLIM_INFINITY else hard
    return value, value


def _rlim(value: int) -> int:
    return value if value >= 0 else 2**64 - 1  # RLIM_INFINITY as the kernel spells it


def _find_program(name: str, cwd: Path, path: str) -> str:
    """The file `name` runs, found as execvp would (PATH, or relative to the tool's folder)."""
    if "/" in name:
        program = str(cwd / name)
        if not os.path.isfile(program):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    else:
        found = shutil.which(name, path=path)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
        program = found
    if not os.access(program, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), name)
    return program


#: how the exec shim is compiled, in order of preference: without the C library (x86-64
#: only; its start-up costs a seventh of a static glibc build's), with it and static, with it
SHIM_BUILDS = (
    (
        *("-static", "-nostdlib", "-ffreestanding", "-fno-builtin", "-fno-stack-protector"),
        *("-fno-tree-loop-distribute-patterns", "-DCONFINE_NOLIBC"),
    ),
    ("-static",),
    (),
)


def _build_shim() -> Path | None:
    """The exec shim, compiled once per source into the user's cache (0700); None when no
    C compiler is at hand (tools then confine themselves in a forked child: slower)."""
    source = resources.files("streamsvc").joinpath("confine.c").read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "streamsvc"
    target = cache / f"confine-{hashlib.sha256(source + repr(SHIM_BUILDS).encode()).hexdigest()[:16]}"
    compiler = shutil.which("cc") or shutil.which("gcc")
    try:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = cache.stat()
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            log.warning("not using %s for the exec shim: writable by others", cache)
            return None
        if target.is_file():
            return target
        if compiler is None:
            log.warning("no C compiler: tools are confined by a fork of the service (slower spawns)")
            return None
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            (Path(tmp) / "confine.c").write_bytes(source)
            for flags in SHIM_BUILDS:
                built = compile_shim(compiler, Path(tmp), flags)
                if built.returncode == 0:
                    os.replace(Path(tmp) / "confine", target)
                    return target
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("cannot build the exec shim: %s", exc)
        return None
    log.warning("cannot build the exec shim: %s", built.stderr.decode(errors="replace")[-500:])
    return None


def compile_shim(compiler: str, folder: Path, flags: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
    """Compile `folder`/confine.c into `folder`/confine."""
    argv = [compiler, "-O2", *flags, "-o", "confine", "confine.c"]
    return subprocess.run(argv, cwd=folder, capture_output=True, timeout=60, check=False)


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
        for pid in _read(group / "cgroup.procs").split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _read(path: Path) -> bytes:
    """A cgroup file's content: four system calls, where `Path.read_bytes` makes seven.
    Read to its end: such a file may come a page per read (a large group's cgroup.procs)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        parts = []
        while part := os.read(fd, CGROUP_READ_BYTES):
            parts.append(part)
        return b"".join(parts)
    finally:
        os.close(fd)


def _field(stat: bytes, name: bytes) -> int:
    """The value of `name` in a cgroup file of `name value` lines; ValueError if absent."""
    for line in stat.splitlines():
        key, _, value = line.partition(b" ")
        if key == name:
            return int(value)
    raise ValueError(f"no {name.decode()} in the file")


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _empty_group(group: Path) -> bool:
    try:
        return not _read(group / "cgroup.procs").strip()
    except FileNotFoundError:
        return True
    except OSError:
        return False


def _remove_group(group: Path) -> bool:
    """Remove a cgroup folder; whether it is gone (one that still holds a process stays)."""
    try:
        group.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
