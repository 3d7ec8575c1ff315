"""The command line end to end: a real `python -m streamsvc server` process over a real socket."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import signal
import socket
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import (
    PY,
    START_BOUND_S,
    Event,
    Launch,
    Server,
    assert_ended_lost,
    assert_gone,
    assert_numbered,
    child_env,
    collect,
    free_port,
    get_json,
    is_gone,
    post_job,
    read_sse,
    session,
    stream_of,
)

from streamsvc import __main__ as streamsvc_main
from streamsvc.config import DEMO_DIR

#: the `hang` tool's kill_grace_s: how long the service waits after TERM before it KILLs the tool
KILL_GRACE_S = 1.0

DEMO_TOOLS = ("progress", "warnings", "fail", "line-count")


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, port: int | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the CLI to its end (for the cases where it must not start)."""
    port = port or free_port()
    return subprocess.run(
        [PY, "-m", "streamsvc", "server", *args, "--host", "127.0.0.1", "--port", str(port)],
        cwd=cwd,
        env=env or child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_BOUND_S,
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *mentions: str) -> None:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for mention in mentions:
        assert mention in lines[0], lines[0]
    assert "serving on" not in result.stdout


async def wait_ready(server: Server, http: aiohttp.ClientSession) -> None:
    """Poll (bounded) until the process printed its "serving on" line and /healthz answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_BOUND_S
    while loop.time() < deadline:
        code = server.proc.poll()
        assert code is None, f"exited with {code}: {server.stderr()}"
        if f"serving on {server.url}" in server.stdout():
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with http.get(f"{server.url}/healthz") as response:
                    if response.status == 200 and await response.json() == {"data": {"status": "ok"}}:
                        return
        await asyncio.sleep(0.05)
    pytest.fail(f"not ready within {START_BOUND_S} s: {server.stdout()} {server.stderr()}")


async def wait_exit(server: Server, bound_s: float) -> int:
    """Poll (bounded) until the process has exited; its status."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound_s
    while (code := server.proc.poll()) is None:
        assert loop.time() < deadline, f"still running after {bound_s} s"
        await asyncio.sleep(0.05)
    return code


def outputs(events: list[Event], stream: str | None = None) -> list[str]:
    return [e.data["line"] for e in events if e.event == "output" and stream in (None, e.data["stream"])]


def write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "streamsvc.toml"
    path.write_text(textwrap.dedent(text))
    return path


HELLO_CONFIG = """
    [server]
    port = 9
    data_dir = "data"
    [projects]
    root = "projects"
    [tools.hello]
    argv = ["echo", "hello"]
"""


# --- start-up refused --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[queue]\nworkers = 0\n", "queue.workers"),
        ("[server]\nportt = 1\n", "server.portt"),
        ("[tools.t]\nargv = []\n", "tools.t.argv"),
        ('[tools.t]\nargv = ["true"]\ncwd = "../x"\n', "tools.t.cwd"),
        ("[server\n", "streamsvc.toml"),
    ],
)
def test_bad_config_file_exits_2_with_one_line_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = write_config(tmp_path / "etc", text)
    result = run_cli("--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, key)
    assert not (tmp_path / "var").exists()
    assert not (tmp_path / "etc" / "var").exists()


def test_missing_config_file_exits_2_naming_it(tmp_path: Path) -> None:
    result = run_cli("--config", "no-such.toml", cwd=tmp_path)
    assert result.returncode == 2
    assert_one_line_error(result, "no-such.toml")


def test_streamsvc_config_env_var_is_read(tmp_path: Path) -> None:
    path = write_config(tmp_path / "etc", "[limits]\ntimeout_s = -1\n")
    result = run_cli(cwd=tmp_path, env=child_env(STREAMSVC_CONFIG=str(path)))
    assert result.returncode == 2
    assert_one_line_error(result, "limits.timeout_s")


def test_data_dir_that_is_a_file_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "var").write_text("not a folder")
    result = run_cli(cwd=tmp_path)
    assert_one_line_error(result, "data_dir", str(tmp_path / "var"))
    assert (tmp_path / "var").read_text() == "not a folder"


def test_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(cwd=tmp_path, port=port)
    assert_one_line_error(result, str(port))


@pytest.mark.skipif(os.geteuid() != 0, reason="run_as is only looked up when the service runs as root")
def test_run_as_unknown_user_is_a_one_line_error_naming_the_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[server]\nrun_as = "no-such-user-here"\n')
    result = run_cli("--config", str(path), cwd=tmp_path)
    assert_one_line_error(result, "server.run_as")


# --- start-up -----------------------------------------------------------------------------------


async def test_env_var_config_is_served_with_cli_host_and_port(tmp_path: Path, launch: Launch) -> None:
    path = write_config(tmp_path / "etc", HELLO_CONFIG)
    (tmp_path / "etc" / "projects" / "p").mkdir(parents=True)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    server = await launch(cwd=cwd, env=child_env(STREAMSVC_CONFIG=str(path)))  # the file's port 9 is overridden
    async with session() as http:
        await wait_ready(server, http)
        tools = await get_json(http, f"{server.url}/api/tools")
        assert [tool["id"] for tool in tools] == ["hello"]
        job_id = await post_job(http, server, "hello", "p")
        events = await stream_of(http, server, job_id)
    assert outputs(events) == ["hello"]
    assert "(tools: hello)" in server.stdout()
    assert (tmp_path / "etc" / "data" / "jobs" / f"{job_id}.log").is_file()  # beside the file, not in cwd
    assert not (cwd / "var").exists()


async def test_config_flag_wins_over_the_env_var(tmp_path: Path, launch: Launch) -> None:
    bad = write_config(tmp_path / "bad", "[queue]\nworkers = 0\n")
    good = write_config(tmp_path / "good", HELLO_CONFIG)
    server = await launch("--config", str(good), cwd=tmp_path, env=child_env(STREAMSVC_CONFIG=str(bad)))
    async with session() as http:
        await wait_ready(server, http)
        tools = await get_json(http, f"{server.url}/api/tools")
    assert [tool["id"] for tool in tools] == ["hello"]


async def test_embedded_default_runs_every_demo_tool(tmp_path: Path, launch: Launch) -> None:
    server = await launch(cwd=tmp_path)
    async with session() as http:
        await wait_ready(server, http)
        tools = await get_json(http, f"{server.url}/api/tools")
        assert {tool["id"] for tool in tools} == set(DEMO_TOOLS)
        projects = await get_json(http, f"{server.url}/api/projects")
        assert "hello" in [project["projectId"] for project in projects]

        ids = {
            tool: await post_job(http, server, tool, "hello") for tool in ("progress", "warnings", "fail", "line-count")
        }
        results = await asyncio.gather(*(stream_of(http, server, job_id) for job_id in ids.values()))
        runs = dict(zip(ids, results, strict=True))
        jobs = {tool: await get_json(http, f"{server.url}/api/jobs/{job_id}") for tool, job_id in ids.items()}

    for tool, events in runs.items():
        assert_numbered(events)
        assert events[-1].event == "complete", (tool, events[-1])
        assert events[-1].data["jobId"] == ids[tool]
        assert events[-1].data["output"] == outputs(events)
        assert jobs[tool]["status"] == events[-1].data["status"]

    progress = runs["progress"]
    assert progress[-1].data["status"] == "completed" and progress[-1].data["exitCode"] == 0
    assert len(outputs(progress)) == 21
    assert "step 1/20" in outputs(progress)[0] and "step 20/20" in outputs(progress)[19]
    assert "build finished" in outputs(progress)[20]
    assert jobs["progress"]["outputLines"] == 21

    warnings = runs["warnings"]
    assert warnings[-1].data["status"] == "completed" and warnings[-1].data["exitCode"] == 0
    assert len(outputs(warnings, "stderr")) == 4
    assert all(line.startswith("warning: ") for line in outputs(warnings, "stderr"))
    assert outputs(warnings, "stdout")[-1] == "4 files checked, 0 errors, 4 warnings"

    fail = runs["fail"]
    assert fail[-1].data["status"] == "failed" and fail[-1].data["exitCode"] == 3
    assert fail[-1].data["error"]
    assert any("does not hold" in line for line in outputs(fail, "stderr"))

    count = runs["line-count"]
    readme_lines = len((DEMO_DIR / "projects" / "hello" / "README.md").read_bytes().splitlines())
    assert count[-1].data["status"] == "completed" and count[-1].data["exitCode"] == 0
    assert [re.sub(r"\s+", " ", line.strip()) for line in outputs(count)] == [f"{readme_lines} README.md"]

    assert (tmp_path / "var" / "jobs").is_dir()  # the default data_dir lands in the working directory


# --- shutdown ----------------------------------------------------------------------------------

#: a tool that starts a grandchild in its process group, records both pids, prints a line, then
#: waits on a gate that only the test's clean-up opens
HANG = """
    import os, subprocess, sys, time
    pids, gate = sys.argv[1], sys.argv[2]
    wait = f"import os, time\\nwhile not os.path.exists({gate!r}): time.sleep(0.05)"
    child = subprocess.Popen([sys.executable, "-c", wait])
    for name, pid in (("grandchild", child.pid), ("tool", os.getpid())):
        with open(os.path.join(pids, name + ".tmp"), "w") as f:
            f.write(str(pid))
        os.replace(os.path.join(pids, name + ".tmp"), os.path.join(pids, name + ".pid"))
    print("started", flush=True)
    while not os.path.exists(gate):
        time.sleep(0.05)
"""


async def through_first_output(response: aiohttp.ClientResponse) -> list[Event]:
    """A stream's events up to and with its first `output`."""
    events: list[Event] = []
    async for item in read_sse(response):
        if isinstance(item, Event):
            events.append(item)
            if item.event == "output":
                break
    return events


def hang_config(tmp_path: Path) -> tuple[Path, Path, Path]:
    """The config (tools `hang` and `hello` on project `p`, one worker), the pid folder and the gate."""
    pids, gate = tmp_path / "pids", tmp_path / "gate"
    pids.mkdir()
    project = tmp_path / "etc" / "projects" / "p"
    project.mkdir(parents=True)
    (project / "hang.py").write_text(textwrap.dedent(HANG))
    config = f"""
        [server]
        data_dir = "data"
        [projects]
        root = "projects"
        [queue]
        workers = 1
        [tools.hang]
        argv = [{PY!r}, "hang.py", {str(pids)!r}, {str(gate)!r}]
        timeout_s = 120
        kill_grace_s = {KILL_GRACE_S}
        [tools.hello]
        argv = [{PY!r}, "-c", "print('hello')"]
    """
    return write_config(tmp_path / "etc", config), pids, gate


@contextlib.contextmanager
def released(pids: Path, gate: Path) -> Iterator[None]:
    """Whatever happens, the hanging tool and its grandchild end when the test does."""
    try:
        yield
    finally:
        gate.touch()
        for pid_file in pids.glob("*.pid"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


async def test_a_second_service_on_the_same_data_dir_exits_and_leaves_the_first_ones_jobs_alone(
    tmp_path: Path, launch: Launch
) -> None:
    """Run twice from one folder, or restarted while the old one still runs: the second must
    not end the first one's running job as lost, nor run its queued job a second time."""
    path, pids, gate = hang_config(tmp_path)
    with released(pids, gate):
        server = await launch("--config", str(path), cwd=tmp_path)
        async with session() as http:
            await wait_ready(server, http)
            job_id = await post_job(http, server, "hang", "p")
            queued_id = await post_job(http, server, "hello", "p")  # one worker: it waits
            async with http.get(f"{server.url}/api/stream/{job_id}") as response:
                events = await through_first_output(response)
                second = await asyncio.to_thread(run_cli, "--config", str(path), cwd=tmp_path)
                assert_one_line_error(second, "data_dir", "in use", f"pid {server.proc.pid}")
                gate.touch()
                events += [item async for item in read_sse(response) if isinstance(item, Event)]
            assert_numbered(events)
            assert outputs(events) == ["started"] and events[-1].data["status"] == "completed"
            assert await stream_of(http, server, job_id) == events  # its log holds that story alone
            queued = await stream_of(http, server, queued_id)
            assert outputs(queued) == ["hello"] and queued[-1].data["status"] == "completed"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_ends_the_running_job_as_lost_on_its_stream_and_the_queued_job_runs_after_restart(
    tmp_path: Path, launch: Launch, signum: signal.Signals
) -> None:
    path, pids, gate = hang_config(tmp_path)
    with released(pids, gate):
        server = await launch("--config", str(path), cwd=tmp_path)
        async with session() as http:
            await wait_ready(server, http)
            job_id = await post_job(http, server, "hang", "p")
            queued_id = await post_job(http, server, "hello", "p")  # one worker: it waits
            async with (
                http.get(f"{server.url}/api/stream/{job_id}") as response,
                http.get(f"{server.url}/api/stream/{queued_id}") as queued_response,
            ):
                assert response.status == queued_response.status == 200
                events = await through_first_output(response)
                assert outputs(events) == ["started"]
                tool_pid = int((pids / "tool.pid").read_text())
                grandchild_pid = int((pids / "grandchild.pid").read_text())
                assert not is_gone(tool_pid) and not is_gone(grandchild_pid)

                server.proc.send_signal(signum)
                # the running job's subscriber sees it end, as lost, before the service goes
                events += [item async for item in read_sse(response) if isinstance(item, Event)]
                # the queued job's stream just ends: its job goes on after the restart
                assert await collect(queued_response) == []

            assert_numbered(events)
            assert_ended_lost(events)
            assert [e.data["status"] for e in events if e.event == "status"] == ["running", "lost"]
            assert await wait_exit(server, KILL_GRACE_S + 10) == 0
            assert "Traceback" not in server.stderr(), server.stderr()
            await assert_gone(tool_pid)  # the tool and its grandchild did not outlive the service
            await assert_gone(grandchild_pid)

            again = await launch("--config", str(path), cwd=tmp_path)
            await wait_ready(again, http)
            job = await get_json(http, f"{again.url}/api/jobs/{job_id}")
            assert (job["status"], job["outputLines"]) == ("lost", 1)
            assert await stream_of(http, again, job_id) == events  # the same story, from the log
            resumed = await stream_of(http, again, queued_id, **{"Last-Event-ID": "0"})
            assert outputs(resumed) == ["hello"] and resumed[-1].data["status"] == "completed"


async def test_the_served_app_takes_its_start_up_objects_out_of_the_gcs_view(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full collection must not walk every module and class while streams wait (it took
    12-18 ms here): `server` freezes the heap once the app has started."""
    served: list[web.Application] = []
    monkeypatch.setattr(web, "run_app", lambda app, **_: served.append(app))
    monkeypatch.chdir(tmp_path)
    assert streamsvc_main.main(["server", "--host", "127.0.0.1", "--port", str(free_port())]) == 0
    (app,) = served
    frozen = gc.get_freeze_count()
    try:
        for on_startup in app.on_startup:  # what run_app would run: the pool, the timers, then the freeze
            await on_startup(app)
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()
        await app.cleanup()
