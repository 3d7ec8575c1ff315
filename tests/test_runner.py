"""The runner, end to end: how a tool's process is started, confined, read, and ended.

Every test runs real subprocesses (small Python scripts run with `sys.executable`) through
the service over a real socket and reads the result from the SSE stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pwd
import re
import resource
import shutil
import signal
import subprocess
import textwrap
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import (
    BOUND_S,
    PY,
    Client,
    ClientFactory,
    ConfigFactory,
    Event,
    assert_gone,
    cgroup_controllers,
    follow,
    job_of,
    lines_of,
    read_sse,
    submit,
)

from streamsvc import sandbox as sandbox_module
from streamsvc.config import Limits
from streamsvc.models import JobStatus
from streamsvc.runner import PIPE_READ_BYTES, Run, RunSpec
from streamsvc.sandbox import Sandbox

#: an argument of every process the tests start on purpose, so teardown never kills a reused pid
MARKER = "streamsvc-test-sleeper"
#: a grandchild: argv is [ready_fd, MARKER, term_file]; it writes one byte to the fd `ready_fd`
#: (unless "-"), then sleeps; on SIGTERM it writes "TERM" to `term_file` (unless "-") and exits
SLEEPER = textwrap.dedent(
    """
    import os, signal, sys, time
    ready_fd, _, term_file = sys.argv[1:4]

    def on_term(signum, frame):
        if term_file != "-":
            with open(term_file, "w") as f:
                f.write("TERM")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    if ready_fd != "-":
        os.write(int(ready_fd), b"x")
    time.sleep(60)
    """
)


def spawner(then: str, *, new_session: bool = False, holds_output: bool = True, term_file: str = "-") -> str:
    """A tool script: starts a SLEEPER grandchild (which inherits the job's stdout and stderr
    if `holds_output`), waits until it runs, prints `tool <pid>` and `grandchild <pid>`,
    then runs `then`."""
    redirect = "None" if holds_output else "subprocess.DEVNULL"
    head = f"""
        import os, signal, subprocess, sys, time
        r, w = os.pipe()
        child = subprocess.Popen(
            [sys.executable, "-c", {SLEEPER!r}, str(w), {MARKER!r}, {term_file!r}],
            pass_fds=(w,),
            start_new_session={new_session!r},
            stdout={redirect},
            stderr={redirect},
        )
        os.close(w)
        assert os.read(r, 1) == b"x"
        print("tool", os.getpid(), flush=True)
        print("grandchild", child.pid, flush=True)
    """
    return textwrap.dedent(head) + textwrap.dedent(then)


def py_tool(body: str, *args: str, **options: Any) -> dict[str, Any]:
    """A tool table running `body` with `python -c`."""
    return {"argv": [PY, "-c", textwrap.dedent(body), *args], **options}


@attrs.frozen
class Done:
    """A job followed to its end."""

    client: Client
    job_id: str
    events: list[Event]

    @property
    def result(self) -> dict[str, Any]:
        last = self.events[-1]
        assert last.event == "complete", self.events
        data: dict[str, Any] = last.data
        return data

    @property
    def lines(self) -> list[str]:
        return lines_of(self.events)

    def output(self) -> list[tuple[str, str]]:
        return [(e.data["stream"], e.data["line"]) for e in self.events if e.event == "output"]

    def pid(self, name: str) -> int:
        """The pid a `spawner` tool printed as `<name> <pid>`."""
        for line in self.lines:
            label, _, pid = line.partition(" ")
            if label == name:
                return int(pid)
        raise AssertionError(f"no {name!r} line in {self.lines}")

    async def job(self) -> dict[str, Any]:
        return await job_of(self.client, self.job_id)


async def run(start: ClientFactory, make_config: ConfigFactory, tool: Any, **sections: dict[str, Any]) -> Done:
    """Start the service with one tool `t`, run it once and follow it to its end."""
    client = await start(make_config({"t": tool}, **sections))
    job_id = await submit(client, "t")
    async with asyncio.timeout(BOUND_S * 2):
        events = await follow(client, job_id)
    return Done(client, job_id, events)


async def follow_acting(client: Client, job_id: str, line_prefix: str, action: Callable[[], Awaitable[None]]) -> Done:
    """Follow a job; the first time an output line starts with `line_prefix`, await
    `action()`, then follow on to the end."""
    events: list[Event] = []
    acted = False
    async with asyncio.timeout(BOUND_S * 2), client.get(f"/api/stream/{job_id}") as response:
        assert response.status == 200
        async for item in read_sse(response):
            if not isinstance(item, Event):
                continue
            events.append(item)
            if not acted and item.event == "output" and item.data["line"].startswith(line_prefix):
                acted = True
                await action()
    assert acted, lines_of(events)
    return Done(client, job_id, events)


class Reaper:
    """The pids of processes a test learnt its tools left behind."""

    def __init__(self) -> None:
        self.pids: list[int] = []

    def track(self, pid: int) -> int:
        self.pids.append(pid)
        return pid

    def kill_leftovers(self) -> None:
        for pid in self.pids:
            with contextlib.suppress(OSError):
                if MARKER.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    """If a regression leaves a test's processes running, they are killed after the test."""
    tracked = Reaper()
    yield tracked
    tracked.kill_leftovers()


CONTROLLERS = cgroup_controllers()
needs_pids_cgroup = pytest.mark.skipif(
    "pids" not in CONTROLLERS,
    reason="no writable cgroup-v1 pids hierarchy: without it the service cannot bound processes or find "
    "processes that left the job's process group, when it runs as root",
)
needs_memory_cgroup = pytest.mark.skipif(
    "memory" not in CONTROLLERS,
    reason="no writable cgroup-v1 memory hierarchy: the service falls back to RLIMIT_AS",
)


# --- how the process is started --------------------------------------------------------


async def test_argv_is_executed_without_a_shell(make_config: ConfigFactory, start: ClientFactory) -> None:
    args = ["$HOME; echo pwned", "`id`", "$(id)", "*", "a b", "'quoted'", "x > /tmp/streamsvc-pwned", "|", "&&"]
    done = await run(start, make_config, py_tool("import sys\nfor a in sys.argv[1:]: print(repr(a))", *args))

    assert done.result["status"] == "completed"
    assert done.lines == [repr(a) for a in args]


@pytest.mark.parametrize(
    ("argv0", "reason"),
    [
        ("/nonexistent/streamsvc-no-such-tool", "No such file"),
        ("streamsvc-no-such-tool", "No such file"),
        ("echo pwned", "No such file"),  # a shell string is one program name, not a command line
        ("./data.txt", "Permission denied"),  # exists, not executable
    ],
)
async def test_a_program_that_cannot_start_fails_the_job_cleanly(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path, argv0: str, reason: str
) -> None:
    (tmp_path / "projects" / "proj" / "data.txt").write_text("not a program\n")
    done = await run(start, make_config, [argv0, "arg"])

    assert done.result["status"] == "failed"
    assert argv0 in done.result["error"] and reason in done.result["error"]
    assert done.result["exitCode"] is None and done.result["signal"] is None
    assert done.lines == []
    job = await done.job()
    assert job["status"] == "failed" and job["error"] == done.result["error"]


async def test_cwd_is_the_project_folder(make_config: ConfigFactory, start: ClientFactory, tmp_path: Path) -> None:
    done = await run(start, make_config, py_tool("import os; print(os.getcwd())"))
    assert done.lines == [str((tmp_path / "projects" / "proj").resolve())]


async def test_tool_cwd_option_is_a_subfolder_of_the_project(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    sub = tmp_path / "projects" / "proj" / "src" / "pkg"
    sub.mkdir(parents=True)
    (sub / "marker.txt").write_text("here\n")
    tool = py_tool("import os; print(os.getcwd()); print(open('marker.txt').read().strip())", cwd="src/pkg")
    done = await run(start, make_config, tool)
    assert done.lines == [str(sub.resolve()), "here"]


async def test_a_missing_cwd_fails_with_an_error_naming_the_folder(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    done = await run(start, make_config, py_tool("print('ran')", cwd="no-such-dir"))
    assert done.result["status"] == "failed"
    assert done.lines == []
    assert "no-such-dir" in done.result["error"]


async def test_tool_cwd_cannot_be_a_symlink_out_of_the_project(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "projects" / "proj" / "build").symlink_to(outside)
    done = await run(start, make_config, py_tool("import os; print(os.getcwd())", cwd="build"))

    project = (tmp_path / "projects" / "proj").resolve()
    ran_inside = done.result["status"] == "completed" and Path(done.lines[0]).is_relative_to(project)
    refused = done.result["status"] == "failed" and done.lines == []
    assert ran_inside or refused, (done.result["status"], done.lines)


@pytest.fixture
def service_stdin_open_pipe() -> Iterator[None]:
    """The service's own stdin becomes a pipe held open for the test, so a tool that
    inherited it would block on reading it (not find /dev/null by chance)."""
    read_end, write_end = os.pipe()
    saved = os.dup(0)
    os.dup2(read_end, 0)
    try:
        yield
    finally:
        os.dup2(saved, 0)
        for fd in (saved, read_end, write_end):
            os.close(fd)


@pytest.fixture
def service_stdin_closed() -> Iterator[None]:
    """The service runs with its stdin closed, so the lowest free descriptor is 0."""
    saved = os.dup(0)
    os.close(0)
    try:
        yield
    finally:
        os.dup2(saved, 0)
        os.close(saved)


@pytest.mark.usefixtures("service_stdin_closed")
def test_the_cgroup_descriptors_handed_to_the_shim_are_never_a_standard_stream(tmp_path: Path) -> None:
    # were one of them 0, 1 or 2, the child's stdin or output would replace it before the shim
    # wrote to it: the tool would run outside its groups (no process or memory limit)
    procs = tmp_path / "cgroup.procs"
    procs.write_text("")
    fd = sandbox_module._open_above_stdio(procs)
    try:
        assert fd > 2
        assert os.readlink(f"/proc/self/fd/{fd}") == str(procs)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # for the shim only, by pass_fds
    finally:
        os.close(fd)


COMPILER = shutil.which("cc") or shutil.which("gcc")


@pytest.fixture(params=sandbox_module.SHIM_BUILDS[:2], ids=["without-libc", "static-libc"])
def shim(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """The exec shim, built here as the service builds it."""
    if COMPILER is None:
        pytest.skip("no C compiler")
    flags: tuple[str, ...] = request.param
    if "-DCONFINE_NOLIBC" in flags and os.uname().machine != "x86_64":
        pytest.skip("the shim is built without the C library on x86-64 only")
    shutil.copy(Path(sandbox_module.__file__).with_name("confine.c"), tmp_path)
    built = sandbox_module.compile_shim(COMPILER, tmp_path, flags)
    assert built.returncode == 0, built.stderr.decode()
    return tmp_path / "confine"


def test_the_shim_makes_the_tool_a_batch_process(shim: Path) -> None:
    script = "import os; print(os.sched_getscheduler(0))"
    done = subprocess.run([str(shim), "--", PY, "python", "-c", script], capture_output=True, check=True)
    assert done.stdout.decode().split() == [str(os.SCHED_BATCH)]


def test_the_shim_sets_the_limits_then_becomes_the_tool(shim: Path) -> None:
    script = "ulimit -Sn; ulimit -Hn; ulimit -c; echo $0 $1; head -c 4 /proc/$$/cmdline"
    limits = [f"{resource.RLIMIT_NOFILE}:40:50", f"{resource.RLIMIT_CORE}:0:0"]
    argv = [str(shim), *limits, "--", "/bin/sh", "tool", "-c", script, "zero", "one"]
    done = subprocess.run(argv, capture_output=True, check=False)
    assert (done.returncode, done.stderr) == (0, b"")
    assert done.stdout.decode().split() == ["40", "50", "0", "zero", "one", "tool"]


@pytest.mark.parametrize(
    ("spec", "code", "message"),
    [
        (["7:5:x", "--", "/bin/true", "true"], 126, "cannot set limit (7:5:x): invalid argument"),
        (["7:1:18446744073709551616", "--", "/bin/true", "true"], 126, "cannot set limit (7:1:18446744073709551616)"),
        (["cgroup:99", "--", "/bin/true", "true"], 126, "join the job's cgroup (cgroup:99): bad file descriptor"),
        (["--", "/no/such/tool", "tool"], 127, "cannot run (/no/such/tool): no such file or directory (errno 2)"),
        (["--", "/bin/true"], 126, "usage"),
    ],
)
def test_the_shim_says_what_it_could_not_do(shim: Path, spec: list[str], code: int, message: str) -> None:
    done = subprocess.run([str(shim), *spec], capture_output=True, check=False)
    assert done.returncode == code
    assert done.stderr.decode().startswith("streamsvc: ") and message in done.stderr.decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can change its user")
def test_the_shim_drops_root_for_good(shim: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    script = "grep -E '^(Uid|Gid|Groups):' /proc/self/status"
    argv = [str(shim), f"user:{nobody.pw_uid}:{nobody.pw_gid}", "--", "/bin/sh", "sh", "-c", script]
    done = subprocess.run(argv, capture_output=True, check=True)
    fields = {line.split(":")[0]: line.split(":")[1].split() for line in done.stdout.decode().splitlines()}
    assert fields == {"Uid": [str(nobody.pw_uid)] * 4, "Gid": [str(nobody.pw_gid)] * 4, "Groups": []}


@pytest.mark.usefixtures("service_stdin_open_pipe")
async def test_stdin_is_dev_null(make_config: ConfigFactory, start: ClientFactory) -> None:
    body = """
        import os, sys
        print(len(sys.stdin.buffer.read()))
        print(os.path.realpath("/proc/self/fd/0"))
    """
    done = await run(start, make_config, py_tool(body, timeout_s=3, kill_grace_s=0.2))
    assert done.result["status"] == "completed"  # an inherited open pipe would block the read to a timeout
    assert done.lines == ["0", "/dev/null"]


async def test_no_descriptor_of_the_service_leaks_into_the_tool(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    body = """
        import os
        for fd in range(3, 4096):
            try:
                os.fstat(fd)
            except OSError:
                continue
            print("open", fd, os.readlink(f"/proc/self/fd/{fd}"))
        print("checked")
    """
    done = await run(start, make_config, py_tool(body))
    assert done.lines == ["checked"]  # not the listening socket, a client connection, a job log...


async def test_environment_is_clean(
    make_config: ConfigFactory, start: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMSVC_SECRET", "hunter2")
    monkeypatch.setenv("PYTHONPATH", "/leaked")
    tool = {"argv": [PY, "env.py"], "env": {"TOOL_FLAG": "on", "LC_ALL": "C"}}
    done = await run(start, make_config, tool)

    env = dict(line.split("=", 1) for line in done.lines)
    assert set(env) == {"PATH", "HOME", "LANG", "TOOL_FLAG", "LC_ALL"}
    assert env["TOOL_FLAG"] == "on" and env["LC_ALL"] == "C"
    assert all(env[key] for key in ("PATH", "HOME", "LANG"))
    assert not any("hunter2" in line or "/leaked" in line for line in done.lines)


async def test_every_job_gets_an_empty_private_home_whatever_the_last_one_left(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    # each job shows its HOME as it found it, then leaves something behind: a file, a
    # looser mode, nothing at all
    body = """
        import os, stat, sys
        home = os.environ["HOME"]
        parent = oct(stat.S_IMODE(os.stat(os.path.dirname(home)).st_mode))
        print(home, oct(stat.S_IMODE(os.lstat(home).st_mode)), parent, sorted(os.listdir(home)))
        if sys.argv[1] == "file":
            open(os.path.join(home, ".cache"), "w").write("secret")
        elif sys.argv[1] == "chmod":
            os.chmod(home, 0o777)
    """
    tools = {leaves: py_tool(body, leaves) for leaves in ("file", "chmod", "nothing")}
    client = await start(make_config(tools, queue={"workers": 1}))
    seen = []
    for leaves in ("nothing", "file", "nothing", "chmod", "nothing", "nothing"):
        events = await follow(client, await submit(client, leaves))
        assert events[-1].data["status"] == "completed", events[-1].data
        seen.append(lines_of(events)[0].split(" ", 3))
        if leaves != "nothing":  # a home a job changed is not handed on: it is gone
            assert not await asyncio.to_thread(os.path.exists, seen[-1][0])

    # the homes' folder lets the tools' user in, and no one list or add anything
    assert all(mode == "0o700" and parent == "0o711" and listing == "[]" for _, mode, parent, listing in seen)
    homes = [home for home, _, _, _ in seen]
    assert homes[1] == homes[0] and homes[5] == homes[4]  # an untouched one is handed on
    assert len({homes[1], homes[2], homes[3], homes[4]}) == 3  # after a change, a new one


async def test_jobs_still_get_a_home_after_a_cleaner_removed_the_folder_of_homes(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    tool = py_tool('import os; print(os.environ["HOME"], os.path.isdir(os.environ["HOME"]))')
    client = await start(make_config({"home": tool}, queue={"workers": 1}))
    homes = []
    for _ in range(2):
        events = await follow(client, await submit(client, "home"))
        assert events[-1].data["status"] == "completed", events[-1].data
        home, exists = lines_of(events)[0].split(" ")
        assert exists == "True"
        homes.append(Path(home))
        await asyncio.to_thread(shutil.rmtree, Path(home).parent)  # as systemd-tmpfiles does to old folders
    assert homes[0].parent != homes[1].parent


async def test_tool_runs_in_its_own_session_and_process_group(make_config: ConfigFactory, start: ClientFactory) -> None:
    done = await run(start, make_config, py_tool("import os; print(os.getpid(), os.getpgid(0), os.getsid(0))"))
    pid, pgid, sid = (int(word) for word in done.lines[0].split())
    assert pgid == pid and sid == pid
    assert pgid != os.getpgid(0)


async def test_a_tool_and_its_children_are_batch_processes(make_config: ConfigFactory, start: ClientFactory) -> None:
    # their wake-ups do not preempt the service that streams their output
    body = """
        import os, subprocess, sys
        print(os.sched_getscheduler(0))
        subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"], check=True)
    """
    done = await run(start, make_config, py_tool(body))
    assert done.lines == [str(os.SCHED_BATCH)] * 2
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the service itself is not


# --- how it ends ------------------------------------------------------------------------


async def test_zero_exit_is_completed(make_config: ConfigFactory, start: ClientFactory) -> None:
    done = await run(start, make_config, [PY, "both.py", "0"])
    result = done.result
    assert (result["status"], result["exitCode"], result["signal"], result["error"]) == ("completed", 0, None, None)


async def test_nonzero_exit_is_failed_with_its_exit_code(make_config: ConfigFactory, start: ClientFactory) -> None:
    done = await run(start, make_config, [PY, "both.py", "3"])
    result = done.result
    assert (result["status"], result["exitCode"], result["signal"]) == ("failed", 3, None)
    assert "3" in result["error"]
    assert sorted(done.lines) == ["err 1", "out 1", "out 2"]
    job = await done.job()
    assert (job["status"], job["exitCode"]) == ("failed", 3)


async def test_death_by_signal_is_failed_with_the_signal_name(make_config: ConfigFactory, start: ClientFactory) -> None:
    done = await run(start, make_config, py_tool("import os\nprint('bye', flush=True)\nos.kill(os.getpid(), 9)"))
    result = done.result
    assert (result["status"], result["exitCode"], result["signal"]) == ("failed", None, "SIGKILL")
    assert "SIGKILL" in result["error"]
    assert done.lines == ["bye"]


async def test_timeout_terminates_the_tool_and_its_grandchild(
    make_config: ConfigFactory, start: ClientFactory, reaper: Reaper, tmp_path: Path
) -> None:
    term_file = tmp_path / "grandchild-got-sigterm"
    # On SIGTERM the tool waits for its grandchild, then dies of SIGTERM.
    then = """
        def on_term(signum, frame):
            child.wait()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(signal.SIGTERM, on_term)
        time.sleep(60)
    """
    tool = py_tool(spawner(then, term_file=str(term_file)), timeout_s=2.0, kill_grace_s=5.0)
    done = await run(start, make_config, tool)

    result = done.result
    assert result["status"] == "timeout"
    assert re.search(r"timed? ?out", result["error"], re.IGNORECASE)
    assert result["signal"] == "SIGTERM"  # TERM first: it was enough for this tool
    await assert_gone(reaper.track(done.pid("tool")))
    await assert_gone(reaper.track(done.pid("grandchild")))
    assert term_file.read_text() == "TERM"  # the whole group was sent SIGTERM, not the tool alone
    assert (await done.job())["status"] == "timeout"


async def test_a_tool_ignoring_sigterm_is_killed_after_the_grace(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    body = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """
    done = await run(start, make_config, py_tool(body, timeout_s=1.0, kill_grace_s=0.2))
    assert done.lines == ["ready"]  # SIGTERM was ignored before the timeout came
    assert (done.result["status"], done.result["signal"]) == ("timeout", "SIGKILL")


async def test_a_background_grandchild_holding_stdout_does_not_keep_the_job_alive(
    make_config: ConfigFactory, start: ClientFactory, reaper: Reaper
) -> None:
    # the grandchild inherits the job's stdout and stderr and sleeps on; the tool exits 0 at once
    tool = py_tool(spawner("sys.exit(0)"), timeout_s=2, kill_grace_s=0.2)
    done = await run(start, make_config, tool)

    assert (done.result["status"], done.result["exitCode"]) == ("completed", 0)  # not ended by the timeout
    await assert_gone(reaper.track(done.pid("grandchild")))


@needs_pids_cgroup
async def test_a_grandchild_that_left_the_process_group_is_killed_when_the_tool_exits(
    make_config: ConfigFactory, start: ClientFactory, reaper: Reaper
) -> None:
    # setsid: out of reach of killpg, but still in the job's cgroup
    tool = py_tool(spawner("sys.exit(0)", new_session=True, holds_output=False), timeout_s=30, kill_grace_s=0.2)
    done = await run(start, make_config, tool)

    assert (done.result["status"], done.result["exitCode"]) == ("completed", 0)
    await assert_gone(reaper.track(done.pid("grandchild")))


async def test_cancel_of_a_running_job_ends_its_whole_group(
    make_config: ConfigFactory, start: ClientFactory, reaper: Reaper, tmp_path: Path
) -> None:
    # the tool ignores SIGTERM (so it needs the SIGKILL after the grace); its grandchild exits on it
    term_file = tmp_path / "grandchild-got-sigterm"
    then = """
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """
    tool = py_tool(spawner(then, term_file=str(term_file)), timeout_s=60, kill_grace_s=1.0)
    client = await start(make_config({"t": tool}))
    job_id = await submit(client, "t")
    answers: list[int] = []

    async def cancel() -> None:
        response = await client.delete(f"/api/jobs/{job_id}")
        answers.append(response.status)

    done = await follow_acting(client, job_id, "ready", cancel)

    assert answers == [202]
    assert (done.result["status"], done.result["signal"]) == ("cancelled", "SIGKILL")
    assert [e.data["status"] for e in done.events if e.event == "status"] == ["running", "cancelled"]
    await assert_gone(reaper.track(done.pid("tool")))
    await assert_gone(reaper.track(done.pid("grandchild")))
    assert term_file.read_text() == "TERM"
    assert (await done.job())["status"] == "cancelled"
    assert (await client.delete(f"/api/jobs/{job_id}")).status == 409


async def test_a_cancelled_tools_children_get_the_whole_grace_even_when_the_tool_exits_at_once(
    make_config: ConfigFactory, start: ClientFactory, reaper: Reaper
) -> None:
    # the tool exits the moment SIGTERM comes; its child (in its process group) cleans up first
    body = """
        import os, signal, subprocess, sys, time
        child = (
            "import os, signal, time\\n"
            "def on_term(signum, frame):\\n"  # (os.write: the signal may come inside a print)
            "    os.write(1, b'child cleaning\\\\n')\\n"
            "    time.sleep(0.3)\\n"
            "    os.write(1, b'child cleaned\\\\n')\\n"
            "    os._exit(0)\\n"
            "signal.signal(signal.SIGTERM, on_term)\\n"
            "print('child ready', flush=True)\\n"
            "time.sleep(60)\\n"
        )
        print(f"tool {os.getpid()}", flush=True)
        subprocess.Popen([sys.executable, "-c", child])
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        time.sleep(60)
    """
    client = await start(make_config({"t": py_tool(body, timeout_s=60, kill_grace_s=30)}))
    job_id = await submit(client, "t")

    async def cancel() -> None:
        assert (await client.delete(f"/api/jobs/{job_id}")).status == 202

    done = await follow_acting(client, job_id, "child ready", cancel)
    assert done.lines[-2:] == ["child cleaning", "child cleaned"], done.lines  # not cut short by a SIGKILL
    assert done.result["status"] == "cancelled"
    await assert_gone(reaper.track(done.pid("tool")))


async def test_a_cancel_that_lands_after_the_tool_ended_by_itself_changes_nothing(tmp_path: Path) -> None:
    """The tool has exited, and the service has not yet seen it, when the cancel comes: it
    never signalled the tool, so the job ends as the tool did (completed, exit 0), not as
    cancelled with an exit status of 0."""
    gate = tmp_path / "gate"
    body = f"import os, time\nprint(os.getpid(), flush=True)\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)"
    sandbox = Sandbox.detect("")
    run: Run | None = None

    def sink(stream: str, lines: list[str]) -> None:
        assert run is not None
        gate.touch()  # the tool ends ...
        os.waitid(os.P_PID, int(lines[0]), os.WEXITED | os.WNOWAIT)  # ... and has, before the loop goes on ...
        run.stop(JobStatus.CANCELLED, "cancelled while running")  # ... when the cancel comes

    try:
        run = Run(RunSpec((PY, "-c", body), tmp_path, RunSpec.clean_env({}), Limits()), sandbox, sink)
        outcome = await asyncio.wait_for(run.execute(), BOUND_S)
    finally:
        sandbox.close()
    assert (outcome.status, outcome.exit_code, outcome.signal) == (JobStatus.COMPLETED, 0, None)


# --- how output becomes lines -----------------------------------------------------------


def writes(data: bytes) -> dict[str, Any]:
    """A tool writing `data` to stdout in one go (max_line_bytes 100)."""
    return py_tool(f"import sys; sys.stdout.buffer.write({data!r})", max_line_bytes=100)


async def test_lf_and_crlf_end_lines_and_an_unterminated_last_line_is_kept(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    done = await run(start, make_config, writes(b"one\ntwo\r\nthree\r\n\n\r\nlast"))
    assert done.lines == ["one", "two", "three", "", "", "last"]


async def test_a_line_over_max_line_bytes_is_split(make_config: ConfigFactory, start: ClientFactory) -> None:
    long_line = b"".join(b"%03d" % i for i in range(84))  # 252 bytes, every piece distinguishable
    done = await run(start, make_config, writes(b"short\n" + long_line + b"\nafter\n"))
    text = long_line.decode()
    assert done.lines == ["short", text[:100], text[100:200], text[200:], "after"]


async def test_lines_longer_than_one_read_of_the_pipe_arrive_whole(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    """The pipe is read PIPE_READ_BYTES at a time: a line may span many reads."""
    sizes = [PIPE_READ_BYTES - 1, PIPE_READ_BYTES, 5 * PIPE_READ_BYTES + 7, 3]
    body = f"import sys\nfor i, size in enumerate({sizes}): sys.stdout.write(str(i) * size + '\\n')"
    done = await run(start, make_config, py_tool(body, max_line_bytes=8 * PIPE_READ_BYTES))
    assert done.lines == [str(i) * size for i, size in enumerate(sizes)]


@pytest.mark.parametrize("text", ["a" + "é" * 100, "a" + "\U0001f600" * 60, "ab" + "€" * 70], ids=["2", "4", "3"])
async def test_splitting_never_cuts_a_utf8_character(
    make_config: ConfigFactory, start: ClientFactory, text: str
) -> None:
    done = await run(start, make_config, writes(text.encode() + b"\n"))
    assert len(done.lines) > 1
    assert "".join(done.lines) == text
    assert all(0 < len(line.encode()) <= 100 for line in done.lines)
    assert "\ufffd" not in "".join(done.lines)


async def test_invalid_utf8_is_replaced_not_dropped(make_config: ConfigFactory, start: ClientFactory) -> None:
    done = await run(start, make_config, writes(b"ok \xff\xfe end\n\xc3\nlatin \xe9t\xe9\nfine \xc3\xa9"))
    assert done.lines == ["ok \ufffd\ufffd end", "\ufffd", "latin \ufffdt\ufffd", "fine é"]


async def test_ansi_colour_escapes_pass_through(make_config: ConfigFactory, start: ClientFactory) -> None:
    coloured = "\x1b[1;31mred\x1b[0m plain \x1b[38;5;82mgreen\x1b[m"
    done = await run(start, make_config, writes(coloured.encode() + b"\n"))
    assert done.lines == [coloured]


async def test_stdout_and_stderr_lines_are_tagged(make_config: ConfigFactory, start: ClientFactory) -> None:
    done = await run(start, make_config, [PY, "both.py"])
    assert sorted(done.output()) == [("stderr", "err 1"), ("stdout", "out 1"), ("stdout", "out 2")]
    stdout_lines = [line for stream, line in done.output() if stream == "stdout"]
    assert stdout_lines == ["out 1", "out 2"]


@pytest.mark.parametrize(
    "case",
    [
        (b"x" * 100 + b"\r", b"\nnext\n", ["x" * 100, "next"]),
        (b"x" * 99 + b"\ryy", b"\nnext\n", ["x" * 99 + "\r", "yy", "next"]),
    ],
    ids=["crlf-after-full-line", "cr-at-a-cut"],
)
async def test_lines_do_not_depend_on_where_a_read_ends(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path, case: tuple[bytes, bytes, list[str]]
) -> None:
    first, rest, expected = case
    together = await run(start, make_config, writes(first + rest))
    assert together.lines == expected

    gate = tmp_path / "gate"
    body = f"""
        import os, sys, time
        out = sys.stdout.buffer
        out.write({first!r})
        out.flush()
        print("ready", file=sys.stderr, flush=True)
        while not os.path.exists(sys.argv[1]):
            time.sleep(0.01)
        out.write({rest!r})
    """
    tool = py_tool(body, str(gate), max_line_bytes=100, timeout_s=BOUND_S)
    client = await start(make_config({"t": tool}, server={"data_dir": str(tmp_path / "data-2")}))  # beside the first
    job_id = await submit(client, "t")

    async def open_gate() -> None:
        gate.touch()

    # the first write is in the pipe (and most likely read on its own) before the rest is written
    in_two_reads = await follow_acting(client, job_id, "ready", open_gate)
    assert [line for stream, line in in_two_reads.output() if stream == "stdout"] == expected


# --- caps and limits --------------------------------------------------------------------


async def test_output_cap_stops_the_job(make_config: ConfigFactory, start: ClientFactory, reaper: Reaper) -> None:
    body = """
        import os, sys
        print("tool", os.getpid(), flush=True)
        while True:
            sys.stdout.write("y" * 49 + "\\n")
    """
    done = await run(start, make_config, py_tool(body, max_output_bytes=1000, timeout_s=30, kill_grace_s=0.2))

    result = done.result
    assert result["status"] == "failed" and result["truncated"] is True
    assert "max_output_bytes" in result["error"]
    total = sum(len(line.encode()) + 1 for line in done.lines)
    assert 900 < total <= 1000
    job = await done.job()
    assert job["truncated"] is True and job["outputBytes"] <= 1000
    log = await (await done.client.get(f"/api/jobs/{done.job_id}/log")).read()
    assert len(log) <= 1000
    await assert_gone(reaper.track(done.pid("tool")))


async def test_file_size_limit_stops_a_python_write(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    body = """
        import errno, sys
        try:
            with open(sys.argv[1], "wb") as f:
                f.write(b"x" * 10000)
        except OSError as exc:
            print("write failed:", errno.errorcode[exc.errno])
            sys.exit(1)
        print("wrote everything")
    """
    done = await run(start, make_config, py_tool(body, str(big), max_file_bytes=4096))
    assert done.result["status"] == "failed"
    assert done.lines == ["write failed: EFBIG"]  # Python ignores SIGXFSZ and gets EFBIG
    assert big.stat().st_size <= 4096


async def test_file_size_limit_kills_a_program_with_sigxfsz(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    tool = {"argv": ["dd", "if=/dev/zero", f"of={big}", "bs=1024", "count=10"], "max_file_bytes": 4096}
    done = await run(start, make_config, tool)
    assert (done.result["status"], done.result["signal"]) == ("failed", "SIGXFSZ")
    assert big.stat().st_size <= 4096


async def test_cpu_limit_stops_a_busy_tool(make_config: ConfigFactory, start: ClientFactory) -> None:
    body = """
        print("spinning", flush=True)
        while True:
            pass
    """
    done = await run(start, make_config, py_tool(body, max_cpu_s=1, timeout_s=10, kill_grace_s=0.2))
    assert done.lines == ["spinning"]
    assert (done.result["status"], done.result["signal"]) == ("failed", "SIGXCPU")


@needs_pids_cgroup
async def test_process_limit_holds_for_a_root_service(
    make_config: ConfigFactory, start: ClientFactory, reaper: Reaper
) -> None:
    body = f"""
        import subprocess, sys
        started, errors = [], set()
        for _ in range(20):
            try:
                argv = [sys.executable, "-c", {SLEEPER!r}, "-", {MARKER!r}, "-"]
                started.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            except OSError as exc:
                errors.add(type(exc).__name__)
        print("started", len(started))
        print("errors", *sorted(errors))
        for child in started:
            print("child", child.pid)
    """
    done = await run(start, make_config, py_tool(body, max_processes=5, timeout_s=30, kill_grace_s=0.2))

    started = int(done.lines[0].split()[1])
    assert 0 < started <= 4  # five processes in all, the tool itself being one
    assert done.lines[1] == "errors BlockingIOError"
    children = [int(line.split()[1]) for line in done.lines if line.startswith("child ")]
    assert len(children) == started
    for pid in children:
        await assert_gone(reaper.track(pid))


async def test_memory_limit_stops_a_tool_that_allocates_too_much(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    body = """
        data = b"x" * (512 * 1024 * 1024)
        print("allocated", len(data))
    """
    done = await run(start, make_config, py_tool(body, max_memory_bytes=64 * 1024 * 1024))
    assert done.result["status"] == "failed"
    assert not any(line.startswith("allocated") for line in done.lines)


@needs_memory_cgroup
async def test_memory_limit_kill_is_reported_as_such(make_config: ConfigFactory, start: ClientFactory) -> None:
    body = """
        data = b"x" * (512 * 1024 * 1024)
        print("allocated", len(data))
    """
    done = await run(start, make_config, py_tool(body, max_memory_bytes=64 * 1024 * 1024))
    assert done.result["status"] == "failed"
    assert "memory" in done.result["error"]


START_SLEEPERS = """
    import subprocess
    started = []
    for _ in range(12):
        try:
            started.append(subprocess.Popen(["sleep", "30"]))
        except OSError:
            break
    print(len(started))
    for child in started:  # reaped here: the next job may take this job's groups
        child.kill()
        child.wait()
"""
#: a Python the tools' user can run (the test's own may sit in root's home)
SYSTEM_PY = "/usr/bin/python3"
needs_run_as = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(SYSTEM_PY, os.X_OK),
    reason="run_as applies when the service runs as root, and needs a Python that nobody may run",
)


async def run_in_turn(client: Client, *tool_ids: str) -> list[list[Event]]:
    """Run the tools one after another (each job taking the groups the one before emptied,
    where groups are reused), each followed to its end."""
    runs = []
    for tool_id in tool_ids:
        job_id = await submit(client, tool_id)
        async with asyncio.timeout(BOUND_S * 2):
            runs.append(await follow(client, job_id))
    return runs


@needs_pids_cgroup
@needs_run_as
async def test_every_job_gets_its_own_tools_process_limit(make_config: ConfigFactory, start: ClientFactory) -> None:
    tools = {
        name: {"argv": [SYSTEM_PY, "-c", textwrap.dedent(START_SLEEPERS)], "max_processes": limit}
        for name, limit in (("few", 4), ("many", 64))
    }
    client = await start(make_config(tools, queue={"workers": 1}, server={"run_as": "nobody"}))
    started = [int(lines_of(run)[0]) for run in await run_in_turn(client, "few", "many", "few")]

    assert 0 < started[0] <= 3  # the tool itself is one of the four
    assert started[1] == 12
    assert 0 < started[2] <= 3


@needs_pids_cgroup
@needs_memory_cgroup
async def test_a_root_tools_changes_to_its_own_cgroups_end_with_its_job(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    # tools run as root here (no run_as): they may write their own cgroups' files
    tamper = """
        for line in open("/proc/self/cgroup"):
            _, controllers, path = line.rstrip("\\n").split(":", 2)
            if "pids" in controllers.split(","):
                open(f"/sys/fs/cgroup/pids{path}/pids.max", "w").write("max")
            if "memory" in controllers.split(","):
                open(f"/sys/fs/cgroup/memory{path}/memory.oom_control", "w").write("1")
        print("lifted the process limit and turned the OOM killer off")
    """
    limits = {"max_processes": 4, "max_memory_bytes": 64 * 1024 * 1024, "timeout_s": 10, "kill_grace_s": 0.2}
    tools = {
        "tamper": py_tool(tamper, **limits),
        "few": py_tool(START_SLEEPERS, **limits),
        "hog": py_tool('data = b"x" * (512 * 1024 * 1024)', **limits),
    }
    client = await start(make_config(tools, queue={"workers": 1}))
    tampered, few, hog = await run_in_turn(client, "tamper", "few", "hog")

    assert lines_of(tampered) == ["lifted the process limit and turned the OOM killer off"]
    assert 0 < int(lines_of(few)[0]) <= 3
    assert (hog[-1].data["status"], hog[-1].data["error"]) == ("failed", "memory limit exceeded (67108864 bytes)")


@needs_memory_cgroup
@needs_run_as
async def test_a_job_after_one_that_ran_out_of_memory_is_not_said_to_have(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    limit = 64 * 1024 * 1024
    tools = {
        "hog": {"argv": [SYSTEM_PY, "-c", 'data = b"x" * (512 * 1024 * 1024)'], "max_memory_bytes": limit},
        "fails": {"argv": [SYSTEM_PY, "-c", "raise SystemExit(3)"], "max_memory_bytes": limit},
    }
    client = await start(make_config(tools, queue={"workers": 1}, server={"run_as": "nobody"}))
    hog, fails = (run[-1].data for run in await run_in_turn(client, "hog", "fails"))

    assert "memory" in hog["error"]
    assert fails["error"] == "exited with status 3"


@needs_memory_cgroup
@needs_run_as
@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
async def test_shared_memory_a_job_leaves_behind_is_not_charged_to_the_next_job(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    left = Path("/dev/shm") / f"streamsvc-test-{uuid.uuid4().hex}"
    leave = f"""
        with open({str(left)!r}, "wb") as out:  # 3 MiB the kernel cannot reclaim without swap
            out.write(b"x" * (3 * 1024 * 1024))
    """
    charged = """
        for line in open("/proc/self/cgroup"):
            _, controllers, path = line.rstrip("\\n").split(":", 2)
            if "memory" in controllers.split(","):
                for stat in open(f"/sys/fs/cgroup/memory{path}/memory.stat"):
                    if stat.startswith("total_shmem "):
                        print(stat.split()[1])
    """
    tools = {
        "leave": {"argv": [SYSTEM_PY, "-c", textwrap.dedent(leave)]},
        "charged": {"argv": [SYSTEM_PY, "-c", textwrap.dedent(charged)]},
    }
    client = await start(make_config(tools, queue={"workers": 1}, server={"run_as": "nobody"}))
    try:
        left_behind, after = await run_in_turn(client, "leave", "charged")
    finally:
        left.unlink(missing_ok=True)

    assert left_behind[-1].data["status"] == "completed"
    assert lines_of(after) == ["0"]


@needs_memory_cgroup
async def test_a_job_that_reaches_its_memory_limit_only_through_page_cache_is_not_said_to_run_out(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    # 40 MiB of page cache, then 40 MiB allocated under a 64 MiB limit: the kernel reclaims
    # the cache and the allocation succeeds; the job then fails for its own reason
    body = """
        with open("written", "wb") as out:
            for _ in range(40):
                out.write(b"x" * (1024 * 1024))
        data = b"y" * (40 * 1024 * 1024)
        print("allocated")
        raise SystemExit(3)
    """
    done = await run(start, make_config, py_tool(body, max_memory_bytes=64 * 1024 * 1024))
    assert done.lines == ["allocated"]
    assert done.result["error"] == "exited with status 3"


@pytest.mark.skipif(os.geteuid() != 0, reason="run_as applies when the service runs as root")
async def test_run_as_runs_the_tool_as_that_user_for_good(make_config: ConfigFactory, start: ClientFactory) -> None:
    nobody = pwd.getpwnam("nobody")
    script = 'grep -E "^(Uid|Gid|Groups):" /proc/self/status; touch "$HOME/x" && echo home writable'
    done = await run(start, make_config, ["/bin/sh", "-c", script], server={"run_as": "nobody"})
    assert done.result["status"] == "completed", done.events
    fields = {line.split(":")[0]: line.split(":")[1].split() for line in done.lines[:3]}
    assert fields["Uid"] == [str(nobody.pw_uid)] * 4  # real, effective, saved, filesystem: no way back
    assert fields["Gid"] == [str(nobody.pw_gid)] * 4
    assert fields["Groups"] == []  # none of the service's supplementary groups
    assert done.lines[3] == "home writable"
