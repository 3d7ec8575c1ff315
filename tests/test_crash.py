"""Crashes: a `kill -9` of a real service mid-job, the torn files it leaves, a full data folder."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import subprocess
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp.test_utils import TestClient
from aiohttp.web import Application
from conftest import (
    PY,
    TORN_FRAME,
    ClientFactory,
    ConfigFactory,
    Event,
    Launch,
    Server,
    assert_ended_lost,
    assert_numbered,
    crash,
    eventually,
    follow,
    get_json,
    is_gone,
    job_of,
    lines_of,
    post_job,
    read_sse,
    session,
    stream_of,
    submit,
    wait_job,
    write_project,
)

from streamsvc.config import Config
from streamsvc.sandbox import Sandbox

#: bounds on waits for a condition; generous, they only matter when something is broken
GONE_BOUND_S = 10.0
JOB_BOUND_S = 10.0

#: the tool killed with its service: records its pid, starts a grandchild that leaves the
#: process group with setsid(), prints whole lines, then an unended one, then waits on a gate
CRASH = """
    import os, subprocess, sys, time
    pids, gate = sys.argv[1], sys.argv[2]
    with open(os.path.join(pids, "tool.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(pids, "tool.tmp"), os.path.join(pids, "tool.pid"))
    print(f"tool {os.getpid()}", flush=True)
    subprocess.Popen([sys.executable, "escape.py", pids, gate])
    while not os.path.exists(os.path.join(pids, "grandchild.pid")):
        time.sleep(0.01)
    for i in range(5):
        print(f"line {i}", flush=True)
    print("ready", flush=True)
    sys.stdout.write("an unended line")
    sys.stdout.flush()
    while not os.path.exists(gate):
        time.sleep(0.05)
"""

#: the grandchild: a session (and process group) of its own, its pid printed and recorded
ESCAPE = """
    import os, sys, time
    pids, gate = sys.argv[1], sys.argv[2]
    os.setsid()
    print(f"grandchild {os.getpid()}", flush=True)
    with open(os.path.join(pids, "grandchild.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.replace(os.path.join(pids, "grandchild.tmp"), os.path.join(pids, "grandchild.pid"))
    while not os.path.exists(gate):
        time.sleep(0.05)
"""

#: the lines CRASH prints before it waits (after its own and the grandchild's pid)
CRASH_LINES = [*(f"line {i}" for i in range(5)), "ready"]

#: prints "waiting", blocks until the file argv[1] exists, then prints about 2 MB
FLOOD = """
import os, sys, time
print("waiting", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
for i in range(20000):
    print(f"flood {i:05d} " + "x" * 90)
"""

#: prints "waiting", blocks until the file argv[1] exists, then ends without a word more
HOLD = """
import os, sys, time
print("waiting", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
"""

#: like FLOOD, but outlives the SIGTERM that stops it (recording it in argv[2]) until argv[3] exists
STUBBORN = """
import os, signal, sys, time
gate, termed, release = sys.argv[1:4]
signal.signal(signal.SIGTERM, lambda *_: open(termed, "w").close())
print("waiting", flush=True)
while not os.path.exists(gate):
    time.sleep(0.01)
for i in range(20000):
    print(f"flood {i:05d} " + "x" * 90)
sys.stdout.flush()
while not os.path.exists(release):
    time.sleep(0.01)
"""


@attrs.frozen
class CrashSetup:
    config: Path
    data: Path
    pids: Path
    gate: Path


@pytest.fixture
def crash_setup(tmp_path: Path) -> Iterator[CrashSetup]:
    """A config file with tools `crash` and `hello` (one worker); the crash tool's processes end with the test."""
    etc = tmp_path / "etc"
    project = write_project(etc / "projects")
    (project / "crash.py").write_text(textwrap.dedent(CRASH))
    (project / "escape.py").write_text(textwrap.dedent(ESCAPE))
    pids, gate = tmp_path / "pids", tmp_path / "gate"
    pids.mkdir()
    config = etc / "streamsvc.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            data_dir = "data"
            [queue]
            workers = 1
            [projects]
            root = "projects"
            [tools.crash]
            argv = [{json.dumps(PY)}, "crash.py", {json.dumps(str(pids))}, {json.dumps(str(gate))}]
            timeout_s = 120
            [tools.hello]
            argv = [{json.dumps(PY)}, "hello.py"]
            """
        )
    )
    try:
        yield CrashSetup(config, etc / "data", pids, gate)
    finally:
        gate.touch()
        for pid_file in pids.glob("*.pid"):
            pid = int(pid_file.read_text())
            with contextlib.suppress(OSError):
                if b".py" in Path(f"/proc/{pid}/cmdline").read_bytes():  # still ours, not a reused pid
                    os.kill(pid, signal.SIGKILL)


async def get_text(http: aiohttp.ClientSession, url: str, **headers: str) -> str:
    async with http.get(url, headers=headers) as response:
        assert response.status == 200, await response.text()
        return await response.text()


async def read_until_line(http: aiohttp.ClientSession, server: Server, job_id: str, line: str) -> list[Event]:
    """The job's events up to its output `line`; then the subscriber leaves."""
    events: list[Event] = []
    async with http.get(f"{server.url}/api/stream/{job_id}") as response:
        assert response.status == 200, await response.text()
        async for item in read_sse(response):
            if isinstance(item, Event):
                events.append(item)
                if item.event == "output" and item.data["line"] == line:
                    return events
    pytest.fail(f"the stream ended before {line!r}: {events}")


async def crash_mid_job(http: aiohttp.ClientSession, server: Server) -> tuple[str, list[Event]]:
    """Start the crash tool, wait until it printed its whole lines, `kill -9` the service."""
    job_id = await post_job(http, server, "crash")
    seen = await read_until_line(http, server, job_id, "ready")
    server.kill_9()
    return job_id, seen


def pids_of(lines: list[str]) -> tuple[int, int]:
    """(tool pid, grandchild pid) as the crash tool and its grandchild printed them."""
    assert lines[0].startswith("tool ") and lines[1].startswith("grandchild "), lines
    return int(lines[0].split()[1]), int(lines[1].split()[1])


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from the state on: state, ppid, pgrp, session, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


async def wait_gone(pid: int, what: str) -> None:
    try:
        await eventually(lambda: is_gone(pid), f"{what} {pid} is gone", bound_s=GONE_BOUND_S)
    except TimeoutError:
        pytest.fail(f"{what} {pid} outlived the killed service by {GONE_BOUND_S} s")


def assert_ended_lost_after_running(events: list[Event]) -> None:
    assert_ended_lost(events)
    assert [e.data["status"] for e in events if e.event == "status"] == ["running", "lost"]


# --- kill -9 mid-job, then a restart ---------------------------------------------------------


async def test_kill_9_mid_job_loses_it_with_its_output_kept_and_the_queued_job_runs_after_restart(
    launch: Launch, crash_setup: CrashSetup
) -> None:
    async with session() as http:
        first = await launch("--config", str(crash_setup.config))
        job_id = await post_job(http, first, "crash")
        seen = await read_until_line(http, first, job_id, "ready")
        queued_id = await post_job(http, first, "hello")
        queued = await get_json(http, f"{first.url}/api/jobs/{queued_id}")
        assert (queued["status"], queued["queuePosition"]) == ("queued", 1)
        first.kill_9()

        again = await launch("--config", str(crash_setup.config))
        lost = await get_json(http, f"{again.url}/api/jobs/{job_id}")
        history = await stream_of(http, again, job_id)
        log = await get_text(http, f"{again.url}/api/jobs/{job_id}/log")
        ran = await stream_of(http, again, queued_id)
        done = await get_json(http, f"{again.url}/api/jobs/{queued_id}")

    printed = lines_of(seen)
    assert printed[2:] == CRASH_LINES
    pids_of(printed)

    assert lost["status"] == "lost"
    assert lost["completedAt"] is not None
    assert lost["outputLines"] == len(printed)
    assert_numbered(history)
    assert lines_of(history) == printed
    assert [(e.id, e.event, e.data) for e in history[: len(seen)]] == [(e.id, e.event, e.data) for e in seen]
    assert_ended_lost_after_running(history)
    # every whole line the tool wrote before the kill, in order; the unended one is no line yet
    whole = log.split("\n")
    assert whole[-1] == ""
    assert whole[: len(printed)] == printed
    assert whole[len(printed) : -1] in ([], ["an unended line"])

    assert_numbered(ran)
    assert ran[-1].event == "complete"
    assert (ran[-1].data["status"], ran[-1].data["exitCode"]) == ("completed", 0)
    assert lines_of(ran) == ["hello", "world"]
    assert (done["status"], done["exitCode"], done["outputLines"]) == ("completed", 0, 2)


def writable_cgroups() -> dict[str, Path]:
    sandbox = Sandbox.detect("")
    try:
        return dict(sandbox.cgroup_parents)
    finally:
        sandbox.close()


async def test_kill_9_of_the_service_leaves_no_process_of_its_job_even_one_that_called_setsid(
    launch: Launch, crash_setup: CrashSetup
) -> None:
    if not writable_cgroups():
        pytest.skip("no writable cgroup here: nothing can find a killed service's setsid() descendants")
    async with session() as http:
        server = await launch("--config", str(crash_setup.config))
        job_id = await post_job(http, server, "crash")
        printed = lines_of(await read_until_line(http, server, job_id, "ready"))
        tool_pid, grandchild_pid = pids_of(printed)
        assert not is_gone(tool_pid) and not is_gone(grandchild_pid)
        tool_pgrp, grandchild_pgrp, grandchild_session = (
            stat_fields(tool_pid)[2],
            stat_fields(grandchild_pid)[2],
            stat_fields(grandchild_pid)[3],
        )
        assert grandchild_pgrp != tool_pgrp and grandchild_session == str(grandchild_pid)  # it escaped the group

        server.kill_9()

    await wait_gone(tool_pid, "the tool")
    await wait_gone(grandchild_pid, "the tool's setsid() grandchild")


async def test_torn_log_tail_and_torn_records_left_by_a_kill_9_are_harmless(
    launch: Launch, crash_setup: CrashSetup
) -> None:
    async with session() as http:
        first = await launch("--config", str(crash_setup.config))
        job_id, seen = await crash_mid_job(http, first)

        jobs = crash_setup.data / "jobs"
        with (jobs / f"{job_id}.log").open("ab") as log_file:
            log_file.write(TORN_FRAME)
        torn_id = str(uuid.uuid4())
        with (jobs / "records.jsonl").open("ab") as journal:
            journal.write(f'{{"job_id": "{torn_id}", "status": "runn'.encode())

        again = await launch("--config", str(crash_setup.config))
        lost = await get_json(http, f"{again.url}/api/jobs/{job_id}")
        listed = await get_json(http, f"{again.url}/api/jobs")
        async with http.get(f"{again.url}/api/jobs/{torn_id}") as response:
            torn_status, torn_body = response.status, await response.json()
        raw = await get_text(http, f"{again.url}/api/stream/{job_id}")
        history = await stream_of(http, again, job_id)
        resumed = await stream_of(http, again, job_id, **{"Last-Event-ID": "3"})
        log = await get_text(http, f"{again.url}/api/jobs/{job_id}/log")

    printed = lines_of(seen)
    assert lost["status"] == "lost"
    assert [job["jobId"] for job in listed] == [job_id]
    assert torn_status == 404 and torn_body["error"]["code"] == "unknown_job"

    assert "event: out\n" not in raw and "id: 99" not in raw and "event: outid" not in raw
    assert_numbered(history)
    assert {e.event for e in history} <= {"status", "output", "complete"}
    assert lines_of(history) == printed
    assert_ended_lost_after_running(history)
    assert [(e.id, e.event, e.data) for e in resumed] == [(e.id, e.event, e.data) for e in history[3:]]
    assert log == "".join(f"{line}\n" for line in printed) or log == "".join(
        f"{line}\n" for line in [*printed, "an unended line"]
    )


# --- a full data folder ------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, unmounted when the test ends."""
    mount = tmp_path / "disk"
    mount.mkdir()
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)],
            capture_output=True,
            text=True,
            check=False,
            timeout=GONE_BOUND_S,
        )
    except OSError as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        done = subprocess.run(["umount", str(mount)], capture_output=True, check=False, timeout=GONE_BOUND_S)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False, timeout=GONE_BOUND_S)


def remount(mount: Path, mode: str) -> None:
    """Make the mounted file system read-only ("ro") or writable again ("rw")."""
    command = ["mount", "-o", f"remount,{mode}", str(mount)]
    subprocess.run(command, check=True, capture_output=True, timeout=GONE_BOUND_S)


def fill(folder: Path) -> Path:
    """Write a file in `folder` until the file system says it is full; the file."""
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as file:
        for _ in range(1 << 20):
            try:
                file.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return filler
    pytest.fail(f"{folder} never filled up")


def fill_and_open(disk: Path, gate: Path) -> Path:
    filler = fill(disk)
    gate.touch()
    return filler


async def assert_healthy(client: TestClient[Any, Application]) -> None:
    response = await client.get("/healthz")
    assert response.status == 200
    assert await response.json() == {"data": {"status": "ok"}}


async def assert_a_job_completes(client: TestClient[Any, Application]) -> None:
    events = await follow(client, await submit(client, "hello"))
    assert events[-1].event == "complete", events[-1]
    assert events[-1].data["status"] == "completed"
    assert lines_of(events) == ["hello", "world"]


async def test_a_full_data_dir_refuses_new_jobs_with_503_serves_old_ones_and_recovers_when_freed(
    small_disk: Path, make_config: ConfigFactory, start: ClientFactory
) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}, server={"data_dir": str(small_disk)}))
    old_id = await submit(client, "hello")
    old_events = await follow(client, old_id)
    assert old_events[-1].event == "complete" and old_events[-1].data["status"] == "completed"

    filler = fill(small_disk)
    response = await client.post("/api/execute", json={"toolId": "hello", "projectId": "proj"})
    assert response.status == 503, await response.text()
    error = (await response.json())["error"]
    assert (error["type"], error["code"]) == ("system_error", "storage_unavailable")
    assert "space" in error["message"].lower(), error["message"]

    listed = await (await client.get("/api/jobs")).json()
    assert [job["jobId"] for job in listed["data"]] == [old_id]
    old = await (await client.get(f"/api/jobs/{old_id}")).json()
    assert (old["data"]["status"], old["data"]["outputLines"]) == ("completed", 2)
    log = await client.get(f"/api/jobs/{old_id}/log")
    assert log.status == 200 and await log.text() == "hello\nworld\n"
    again = await follow(client, old_id)
    assert [(e.id, e.event, e.data) for e in again] == [(e.id, e.event, e.data) for e in old_events]
    await assert_healthy(client)

    filler.unlink()
    await assert_a_job_completes(client)


async def test_a_read_only_data_dir_refuses_new_jobs_with_503_and_serves_old_ones(
    small_disk: Path, make_config: ConfigFactory, start: ClientFactory
) -> None:
    client = await start(make_config({"hello": [PY, "hello.py"]}, server={"data_dir": str(small_disk)}))
    old_id = await submit(client, "hello")
    old_events = await follow(client, old_id)
    remount(small_disk, "ro")
    try:
        response = await client.post("/api/execute", json={"toolId": "hello", "projectId": "proj"})
        assert response.status == 503, await response.text()
        error = (await response.json())["error"]
        assert error["code"] == "storage_unavailable" and "read-only" in error["message"].lower(), error
        assert await follow(client, old_id) == old_events
        assert await (await client.get(f"/api/jobs/{old_id}/log")).text() == "hello\nworld\n"
        await assert_healthy(client)
    finally:
        remount(small_disk, "rw")
    await assert_a_job_completes(client)


async def test_a_job_running_at_a_crash_is_served_lost_when_the_data_dir_comes_back_read_only(
    small_disk: Path, make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    """As after a crash and an ext4 remounted read-only: the service still starts, and serves
    the job it cannot record as lost as lost, its log whole."""
    config = make_config({"gate": [PY, "gate.py", str(tmp_path / "gate")]}, server={"data_dir": str(small_disk)})
    client = await start(config)
    job_id = await submit(client, "gate")
    await wait_job(client, job_id, {"outputLines": 1})
    await crash(client, config, job_id, log_tail=TORN_FRAME)
    remount(small_disk, "ro")
    try:
        client = await start(config)
        assert (await job_of(client, job_id))["status"] == "lost"
        events = await follow(client, job_id)
        assert_numbered(events)
        assert_ended_lost_after_running(events)
        assert lines_of(events) == ["waiting"]
        assert await (await client.get(f"/api/jobs/{job_id}/log")).text() == "waiting\n"
        await assert_healthy(client)
    finally:
        remount(small_disk, "rw")


async def read_to_end_filling_the_disk_at_waiting(
    client: TestClient[Any, Application], job_id: str, disk: Path, gate: Path, *, until_line: bool = False
) -> tuple[list[Event], Path]:
    """Follow the job live; when it prints "waiting", fill `disk` and open `gate`, then read on to the
    end of the response (or leave at once with `until_line`). The events and the filler."""
    live: list[Event] = []
    filler: Path | None = None
    async with client.get(f"/api/stream/{job_id}") as response:
        assert response.status == 200
        async for item in read_sse(response):
            if isinstance(item, Event):
                live.append(item)
                if item.event == "output" and item.data["line"] == "waiting":
                    filler = fill_and_open(disk, gate)
                    if until_line:
                        break
    assert filler is not None, live
    return live, filler


def flood_config(make_config: ConfigFactory, disk: Path, gate: Path, **sections: dict[str, Any]) -> Config:
    tools = {
        "flood": [PY, "-c", FLOOD, str(gate)],
        "hold": [PY, "-c", HOLD, str(gate)],
        "hello": [PY, "hello.py"],
    }
    return make_config(tools, server={"data_dir": str(disk)}, **sections)


async def test_a_job_running_when_the_data_dir_fills_fails_saying_its_log_cannot_be_written(
    small_disk: Path, tmp_path: Path, make_config: ConfigFactory, start: ClientFactory
) -> None:
    gate = tmp_path / "gate"
    client = await start(flood_config(make_config, small_disk, gate))
    job_id = await submit(client, "flood")
    live, filler = await read_to_end_filling_the_disk_at_waiting(client, job_id, small_disk, gate)

    job = (await (await client.get(f"/api/jobs/{job_id}")).json())["data"]
    assert job["status"] == "failed", job
    assert "log" in job["error"] and "space" in job["error"].lower(), job["error"]
    await assert_healthy(client)

    log = await client.get(f"/api/jobs/{job_id}/log")
    assert log.status == 200
    lines = (await log.text()).splitlines()
    assert lines == flood_lines(len(lines))
    assert lines_of(live) == lines
    assert_numbered(live)

    filler.unlink()
    await assert_a_job_completes(client)
    await assert_healthy(client)


async def test_subscribers_of_a_job_whose_log_cannot_be_written_get_a_terminal_event(
    small_disk: Path, tmp_path: Path, make_config: ConfigFactory, start: ClientFactory
) -> None:
    gate = tmp_path / "gate"
    client = await start(flood_config(make_config, small_disk, gate))
    job_id = await submit(client, "flood")
    live, _ = await read_to_end_filling_the_disk_at_waiting(client, job_id, small_disk, gate)
    late = await follow(client, job_id)

    for events in (live, late):
        last = events[-1]
        assert last.event in ("error", "complete"), [(e.id, e.event) for e in events[-3:]]
        message = last.data["message"] if last.event == "error" else last.data["error"]
        assert "log" in message, last
        if last.event == "complete":
            assert last.data["status"] == "failed", last


async def test_a_job_that_starts_while_the_data_dir_is_full_ends_and_its_worker_runs_the_next_jobs(
    small_disk: Path, tmp_path: Path, make_config: ConfigFactory, start: ClientFactory
) -> None:
    gate = tmp_path / "gate"
    client = await start(flood_config(make_config, small_disk, gate, queue={"workers": 1}))
    holding = await submit(client, "hold")
    queued = await submit(client, "hello")
    _, filler = await read_to_end_filling_the_disk_at_waiting(client, holding, small_disk, gate)
    filler.unlink()

    try:
        async with asyncio.timeout(JOB_BOUND_S):
            await follow(client, queued)
    except TimeoutError:
        pytest.fail(f"the job that started on a full data folder did not end within {JOB_BOUND_S} s")
    job = (await (await client.get(f"/api/jobs/{queued}")).json())["data"]
    assert job["status"] in ("completed", "failed"), job  # run once space was back, or failed on the full disk
    if job["status"] == "failed":
        assert "log" in job["error"], job
    await assert_a_job_completes(client)
    await assert_healthy(client)


def flood_lines(count: int) -> list[str]:
    return ["waiting", *(f"flood {i:05d} " + "x" * 90 for i in range(count - 1))]


async def test_a_log_write_that_failed_on_a_full_disk_leaves_the_log_intact_once_space_is_back(
    small_disk: Path, tmp_path: Path, make_config: ConfigFactory, start: ClientFactory
) -> None:
    gate, termed, release = tmp_path / "gate", tmp_path / "termed", tmp_path / "release"
    argv = [PY, "-c", STUBBORN, str(gate), str(termed), str(release)]
    config = make_config({"stubborn": {"argv": argv, "kill_grace_s": 120}}, server={"data_dir": str(small_disk)})
    client = await start(config)
    job_id = await submit(client, "stubborn")
    _, filler = await read_to_end_filling_the_disk_at_waiting(client, job_id, small_disk, gate, until_line=True)
    await eventually(termed.exists, "the service stopped the job whose log it could not write")
    filler.unlink()
    release.touch()  # the job ends now, with space for its last events

    events = await follow(client, job_id)
    assert_numbered(events)
    printed = lines_of(events)
    assert printed == flood_lines(len(printed))
    assert events[-1].event == "complete", [(e.id, e.event) for e in events[-3:]]
    assert events[-1].data["status"] == "failed" and "log" in events[-1].data["error"]
    assert events[-1].data["output"] == printed
    log = await client.get(f"/api/jobs/{job_id}/log")
    assert log.status == 200
    assert (await log.text()).splitlines() == printed
