"""The worker pool: cancelling queued and running jobs, queue counts, positions and waits, order."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    PY,
    Client,
    ClientFactory,
    ConfigFactory,
    Event,
    assert_gone,
    collect,
    eventually,
    follow,
    get_data,
    is_gone,
    job_of,
    lines_of,
    read_sse,
    submit,
    submit_running,
    wait_job,
)

from streamsvc import pool as pool_module
from streamsvc import store as store_module
from streamsvc.api import POOL

QUEUE_FIELDS = {
    "concurrency",
    "running",
    "pending",
    "maxPending",
    "position",
    "estimatedWaitMs",
    "estimatedWaitSec",
    "completed",
    "failed",
    "cancelled",
    "timeout",
}
#: starts a grandchild in its process group, prints both pids, then runs until killed
WITH_CHILD = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(f"pids {os.getpid()} {child.pid}", flush=True)
while True:
    time.sleep(0.01)
"""
#: ignores SIGTERM, says so, then runs until killed
STUBBORN = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(f"pids {os.getpid()}", flush=True)
while True:
    time.sleep(0.01)
"""
#: appends its argv[2] to the file argv[1]
APPEND = "import sys\nwith open(sys.argv[1], 'a') as f: f.write(sys.argv[2] + '\\n')"


async def queue(client: Client) -> dict[str, Any]:
    status: dict[str, Any] = await get_data(client, "/api/queue/status")
    assert set(status) == QUEUE_FIELDS, status
    assert status["estimatedWaitSec"] == math.ceil(status["estimatedWaitMs"] / 1000), status
    return status


async def cancel(client: Client, job_id: str) -> dict[str, Any]:
    response = await client.delete(f"/api/jobs/{job_id}")
    assert response.status == 202, await response.text()
    job: dict[str, Any] = (await response.json())["data"]
    return job


async def pids_printed(events: Any) -> list[int]:
    """Read the stream up to the tool's "pids ..." line; its pids."""
    async for item in events:
        if isinstance(item, Event) and item.event == "output" and item.data["line"].startswith("pids "):
            return [int(pid) for pid in item.data["line"].split()[1:]]
    raise AssertionError("the stream ended before the tool printed its pids")


# --- a bug --------------------------------------------------------------------------------


async def test_a_bug_in_ending_a_job_still_ends_its_stream(
    make_config: ConfigFactory, start: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the job has its final status when the bookkeeping of its end fails once
    real = store_module.final_events
    calls: list[int] = []

    def fails_once(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(*args)

    monkeypatch.setattr(store_module, "final_events", fails_once)
    monkeypatch.setattr(pool_module, "final_events", fails_once)
    client = await start(make_config({"hello": [PY, "-c", "print('hello')"]}))
    events = await follow(client, await submit(client, "hello"))
    assert [event.event for event in events][-2:] == ["status", "complete"]
    assert events[-1].data["status"] == "completed" and len(calls) == 2
    again = await follow(client, await submit(client, "hello"))  # the worker lives on
    assert again[-1].event == "complete" and again[-1].data["output"] == ["hello"]


# --- cancel -----------------------------------------------------------------------------


async def test_a_cancelled_queued_job_never_starts(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate, marker = tmp_path / "gate", tmp_path / "marker"
    tools = {
        "gate": [PY, "gate.py", str(gate)],
        "mark": [PY, "-c", "import sys; open(sys.argv[1], 'w').close(); print('started')", str(marker)],
        "hello": [PY, "hello.py"],
    }
    client = await start(make_config(tools, queue={"workers": 1}))
    busy = await submit_running(client, "gate")
    victim = await submit(client, "mark")
    after = await submit(client, "hello")

    async with client.get(f"/api/stream/{victim}") as live:  # a subscriber waiting for it to start
        assert await live.content.readline() == b"retry: 2000\n"
        answer = await cancel(client, victim)
        live_events = await collect(live)
    assert answer["jobId"] == victim and answer["status"] == "cancelled"

    job = await job_of(client, victim)
    assert job["status"] == "cancelled" and job["startedAt"] is None and job["completedAt"] is not None
    assert job["exitCode"] is None and job["signal"] is None and job["outputLines"] == 0
    assert job["queuePosition"] is None and job["estimatedWaitMs"] is None
    assert [(e.id, e.event) for e in live_events] == [(1, "status"), (2, "complete")]
    assert live_events[0].data["status"] == "cancelled"
    assert live_events[1].data["status"] == "cancelled" and live_events[1].data["output"] == []
    assert isinstance(live_events[1].data["error"], str)
    assert (await job_of(client, after))["queuePosition"] == 1  # it moved up

    gate.touch()
    assert (await follow(client, after))[-1].data["status"] == "completed"  # ran after the victim's place
    assert (await follow(client, busy))[-1].data["status"] == "completed"
    assert not marker.exists()
    assert await follow(client, victim) == live_events
    assert (await job_of(client, victim))["status"] == "cancelled"
    response = await client.delete(f"/api/jobs/{victim}")
    assert response.status == 409
    assert (await queue(client))["cancelled"] == 1


async def test_a_cancelled_running_job_ends_with_its_process_group(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    client = await start(make_config({"tree": [PY, "-c", WITH_CHILD]}))
    job_id = await submit(client, "tree")
    async with client.get(f"/api/stream/{job_id}") as response:
        events = read_sse(response)
        pids = await pids_printed(events)
        assert not any(is_gone(pid) for pid in pids)
        answer = await cancel(client, job_id)
        rest = [item async for item in events if isinstance(item, Event)]

    assert answer["jobId"] == job_id
    assert rest[-1].event == "complete" and rest[-1].data["status"] == "cancelled"
    assert [e.data["status"] for e in rest if e.event == "status"] == ["cancelled"]
    job = await job_of(client, job_id)
    assert job["status"] == "cancelled" and job["exitCode"] is None and job["signal"] == "SIGTERM"
    assert job["startedAt"] is not None and job["completedAt"] is not None
    for pid in pids:  # the tool and its child
        await assert_gone(pid)
    assert (await queue(client))["cancelled"] == 1
    assert (await client.delete(f"/api/jobs/{job_id}")).status == 409


async def test_a_running_job_that_ignores_sigterm_is_killed_after_the_grace(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    tool = {"argv": [PY, "-c", STUBBORN], "kill_grace_s": 0.2}
    client = await start(make_config({"stubborn": tool}))
    job_id = await submit(client, "stubborn")
    async with client.get(f"/api/stream/{job_id}") as response:
        events = read_sse(response)
        [pid] = await pids_printed(events)
        await cancel(client, job_id)
        rest = [item async for item in events if isinstance(item, Event)]

    assert rest[-1].event == "complete" and rest[-1].data["status"] == "cancelled"
    job = await job_of(client, job_id)
    assert job["status"] == "cancelled" and job["signal"] == "SIGKILL"
    assert is_gone(pid)


async def test_cancelling_a_running_job_lets_the_next_one_run(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    client = await start(make_config({"gate": [PY, "gate.py", str(gate)], "hello": [PY, "hello.py"]}))
    stuck = await submit_running(client, "gate")
    queued = [await submit(client, "hello") for _ in range(3)]
    await cancel(client, stuck)
    for job_id in queued:
        assert lines_of(await follow(client, job_id)) == ["hello", "world"]
    assert (await job_of(client, stuck))["status"] == "cancelled"
    assert not gate.exists()


# --- queue status -----------------------------------------------------------------------


async def test_queue_status_counts_move_as_jobs_run(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    tools = {
        "gate": [PY, "gate.py", str(gate)],
        "hello": [PY, "hello.py"],
        "fail": [PY, "both.py", "4"],
        "slow": {"argv": [PY, "gate.py", str(tmp_path / "never")], "timeout_s": 0.2, "kill_grace_s": 0.2},
    }
    client = await start(make_config(tools, queue={"workers": 1, "max_pending": 10}))
    idle = {"concurrency": 1, "running": 0, "pending": 0, "maxPending": 10, "position": 1}
    idle |= {"estimatedWaitMs": 0, "estimatedWaitSec": 0}
    assert await queue(client) == idle | {"completed": 0, "failed": 0, "cancelled": 0, "timeout": 0}

    await submit_running(client, "gate")
    status = await queue(client)
    assert (status["running"], status["pending"], status["position"]) == (1, 0, 1)

    queued = [await submit(client, tool) for tool in ("hello", "fail", "slow", "hello")]
    status = await queue(client)
    assert (status["running"], status["pending"], status["position"]) == (1, 4, 5)

    await cancel(client, queued[-1])
    status = await queue(client)
    assert (status["running"], status["pending"], status["position"], status["cancelled"]) == (1, 3, 4, 1)
    assert status["completed"] == status["failed"] == status["timeout"] == 0

    gate.touch()
    for job_id, expected in zip(queued[:3], ("completed", "failed", "timeout"), strict=True):
        assert (await follow(client, job_id))[-1].data["status"] == expected
    status = await queue(client)
    assert status == idle | {"completed": 2, "failed": 1, "cancelled": 1, "timeout": 1}


async def test_a_queued_job_reports_its_position_and_wait(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    tools = {"gate": [PY, "gate.py", str(gate)], "hello": [PY, "hello.py"]}
    client = await start(make_config(tools, queue={"workers": 1}))
    warm = await submit(client, "hello")  # a finished job: the estimate has a duration to go by
    await follow(client, warm)
    assert (await job_of(client, warm))["durationMs"] > 0
    running = await wait_job(client, await submit(client, "gate"), "running")
    first, second = await submit(client, "hello"), await submit(client, "hello")

    one, two = await job_of(client, first), await job_of(client, second)
    assert (one["queuePosition"], two["queuePosition"]) == (1, 2)
    assert 0 < one["estimatedWaitMs"] < two["estimatedWaitMs"]
    assert running["queuePosition"] is None and running["estimatedWaitMs"] is None
    status = await queue(client)
    assert status["pending"] == 2 and status["position"] == 3
    assert status["estimatedWaitMs"] > two["estimatedWaitMs"]
    listed = {job["jobId"]: job for job in await get_data(client, "/api/jobs")}
    assert listed[first] == one and listed[second] == two

    await cancel(client, first)
    moved = await job_of(client, second)
    assert moved["queuePosition"] == 1 and moved["estimatedWaitMs"] == one["estimatedWaitMs"]
    assert (await job_of(client, first))["queuePosition"] is None

    gate.touch()
    assert (await follow(client, second))[-1].data["status"] == "completed"
    done = await job_of(client, second)
    assert done["queuePosition"] is None and done["estimatedWaitMs"] is None


# --- order and concurrency --------------------------------------------------------------


async def test_one_worker_runs_jobs_in_submission_order(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate, order = tmp_path / "gate", tmp_path / "order"
    names = ["t3", "t0", "t5", "t1", "t4", "t2"]
    tools: dict[str, Any] = {name: [PY, "-c", APPEND, str(order), name] for name in names}
    tools["gate"] = [PY, "gate.py", str(gate)]
    client = await start(make_config(tools, queue={"workers": 1}))
    await submit_running(client, "gate")
    jobs = [await submit(client, name) for name in names]
    assert [(await job_of(client, job_id))["queuePosition"] for job_id in jobs] == [1, 2, 3, 4, 5, 6]

    gate.touch()
    for job_id in jobs:
        assert (await follow(client, job_id))[-1].data["status"] == "completed"
    assert order.read_text().split() == names
    started = [(await job_of(client, job_id))["startedAt"] for job_id in jobs]
    assert started == sorted(started)


async def test_workers_run_that_many_jobs_at_once(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gates = [tmp_path / "gate-a", tmp_path / "gate-b"]
    tools = {"a": [PY, "gate.py", str(gates[0])], "b": [PY, "gate.py", str(gates[1])], "hello": [PY, "hello.py"]}
    client = await start(make_config(tools, queue={"workers": 2}))
    a, b = await submit(client, "a"), await submit(client, "b")
    await wait_job(client, a, "running")
    await wait_job(client, b, "running")
    third = await submit(client, "hello")
    status = await queue(client)
    assert (status["concurrency"], status["running"], status["pending"]) == (2, 2, 1)
    assert (await job_of(client, third))["queuePosition"] == 1

    gates[1].touch()  # the second job ends first; its worker takes the third
    assert (await follow(client, b))[-1].data["status"] == "completed"
    assert (await follow(client, third))[-1].data["status"] == "completed"
    assert (await job_of(client, a))["status"] == "running"
    gates[0].touch()
    assert (await follow(client, a))[-1].data["status"] == "completed"


async def test_a_new_job_wakes_one_idle_worker_and_the_others_stay_parked(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    client = await start(make_config({"gate": [PY, "gate.py", str(gate)]}, queue={"workers": 8}))
    assert client.app is not None
    pool = client.app[POOL]
    await eventually(lambda: len(pool._idle) == 8, "every worker parked")
    parked = list(pool._idle)
    job_id = await submit(client, "gate")
    await wait_job(client, job_id, "running")
    assert [waiter.done() for waiter in parked] == [True] + [False] * 7  # one woken, in turn
    assert list(pool._idle) == parked[1:]
    gate.touch()
    assert (await follow(client, job_id))[-1].data["status"] == "completed"
    await eventually(lambda: len(pool._idle) == 8, "the worker parked again")


async def test_a_fault_in_a_jobs_bookkeeping_still_ends_its_stream_and_frees_its_clients_slot(
    make_config: ConfigFactory, start: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (here: the metrics fail once) costs one job's bookkeeping, never a stream that
    waits for an end forever, a client's slot, or the worker."""
    client = await start(make_config({"hello": [PY, "hello.py"]}, clients={"max_active": 1}))
    metrics = client.app[POOL].metrics
    calls: list[str] = []

    def fails_once(job: Any) -> None:
        calls.append(job.job_id)
        if len(calls) == 1:
            raise RuntimeError("a bug in the metrics")

    monkeypatch.setattr(metrics, "finished", fails_once)
    first = await submit(client, "hello")
    events = await follow(client, first)  # ends: its log got its end before the fault
    assert events[-1].event == "complete" and events[-1].data["status"] == "completed"
    second = await submit(client, "hello")  # max_active 1: accepted only if the first's slot was freed
    assert (await follow(client, second))[-1].data["status"] == "completed"
    assert calls == [first, second]
