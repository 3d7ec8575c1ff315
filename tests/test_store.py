"""Durability: the job store across restarts (records, logs, retention, torn files) and the job log."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from conftest import (
    BOUND_S,
    PY,
    TORN_FRAME,
    Client,
    ClientFactory,
    ConfigFactory,
    Event,
    assert_ended_lost,
    assert_numbered,
    collect,
    crash,
    follow,
    get_data,
    is_gone,
    job_of,
    lines_of,
    read_sse,
    record_of,
    submit,
    wait_job,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from streamsvc import joblog as joblog_module
from streamsvc import store as store_module
from streamsvc.api import STORE
from streamsvc.errors import StorageError, UnknownJob
from streamsvc.joblog import JobLog, encode_frame, encode_output, json_string, parse_frames
from streamsvc.models import Job, JobStatus
from streamsvc.runner import MIN_LINE_CHARGE
from streamsvc.store import JOURNAL, JobStore, final_events

#: prints its pid, then blocks until the file named by argv[1] exists
PID_GATE = """
import os, sys, time
print(f"pid {os.getpid()}", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
"""


# --- helpers ----------------------------------------------------------------------------


async def log_of(client: Client, job_id: str) -> str:
    response = await client.get(f"/api/jobs/{job_id}/log")
    assert response.status == 200, await response.text()
    return await response.text()


def without_duration(job: dict[str, Any]) -> dict[str, Any]:
    """The record minus durationMs (see test_durations_survive_a_restart_unchanged)."""
    return {key: value for key, value in job.items() if key != "durationMs"}


def output(line: str, stream: str = "stdout") -> tuple[str, dict[str, Any]]:
    return ("output", {"line": line, "stream": stream, "timestamp": 1})


def make_log(path: Path, lines: list[str], *, terminal: bool) -> JobLog:
    log = JobLog.create(path)
    log.append("status", {"status": "running", "timestamp": 1})
    log.extend(output(line) for line in lines)
    if terminal:
        log.extend([("status", {"status": "completed", "timestamp": 2}), ("complete", {"status": "completed"})])
    return log


def frames_of(blob: bytes) -> list[bytes]:
    return [frame + b"\n\n" for frame in blob.split(b"\n\n") if frame]


# --- restarts over HTTP -----------------------------------------------------------------


async def test_a_finished_job_is_served_the_same_after_a_restart(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    config = make_config({"lines": [PY, "lines.py", "30"], "fail": [PY, "both.py", "2"]})
    client = await start(config)
    ids = [await submit(client, "lines"), await submit(client, "fail")]
    before = {}
    for job_id in ids:
        events = await follow(client, job_id)
        before[job_id] = (await job_of(client, job_id), await log_of(client, job_id), events)
    listing = await get_data(client, "/api/jobs")
    counts = await get_data(client, "/api/queue/status")
    await client.close()

    client = await start(config)
    for job_id, (job, log, events) in before.items():
        assert without_duration(await job_of(client, job_id)) == without_duration(job)
        assert await log_of(client, job_id) == log
        assert await follow(client, job_id) == events
        assert await follow(client, job_id, **{"Last-Event-ID": "3"}) == events[3:]
        assert events[-1].event == "complete"
    assert [without_duration(job) for job in await get_data(client, "/api/jobs")] == [
        without_duration(job) for job in listing
    ]
    assert lines_of(before[ids[0]][2]) == [f"line {i}" for i in range(30)]
    assert (await get_data(client, "/api/queue/status")) == counts
    assert (counts["completed"], counts["failed"]) == (1, 1)
    assert (await client.delete(f"/api/jobs/{ids[0]}")).status == 409

    new = await submit(client, "lines")  # and the restarted service runs jobs
    assert (await follow(client, new))[-1].data["status"] == "completed"


async def test_a_queued_job_runs_after_a_restart_and_the_running_one_is_lost(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    config = make_config({"gate": [PY, "-c", PID_GATE, str(gate)], "hello": [PY, "hello.py"]}, queue={"workers": 1})
    client = await start(config)
    running = await submit(client, "gate")
    queued = await submit(client, "hello")
    started = await wait_job(client, running, {"outputLines": 1})
    pid = int((await log_of(client, running)).split()[1])
    assert started["status"] == "running" and not is_gone(pid)
    await client.close()

    jobs_dir = config.server.data_dir / "jobs"
    assert record_of(jobs_dir, queued)["status"] == "queued"
    assert is_gone(pid)  # the service stopped: the tool did not outlive it

    client = await start(config)
    events = await follow(client, queued)
    assert_numbered(events)
    assert events[0].event == "status" and events[0].data["status"] == "running"
    assert lines_of(events) == ["hello", "world"]
    assert events[-1].event == "complete" and events[-1].data["status"] == "completed"
    assert (await job_of(client, queued))["status"] == "completed"

    lost = await job_of(client, running)
    assert lost["status"] == "lost" and lost["exitCode"] is None
    assert lost["completedAt"] is not None and isinstance(lost["error"], str)
    events = await follow(client, running)
    assert_numbered(events)
    assert lines_of(events) == [f"pid {pid}"]
    assert_ended_lost(events)
    assert (await client.delete(f"/api/jobs/{running}")).status == 409


async def test_a_job_running_at_a_crash_is_lost_after_the_restart(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    config = make_config({"gate": [PY, "gate.py", str(gate)]})
    client = await start(config)
    job_id = await submit(client, "gate")
    await wait_job(client, job_id, {"outputLines": 1})
    # the record still says running, the log has no end and a frame half written
    record = await crash(client, config, job_id, log_tail=TORN_FRAME)
    assert record["status"] == "running"

    client = await start(config)
    job = await job_of(client, job_id)
    assert job["status"] == "lost" and job["completedAt"] is not None and isinstance(job["error"], str)
    events = await follow(client, job_id)
    assert_numbered(events)
    assert [e.event for e in events[:2]] == ["status", "output"]
    assert_ended_lost(events)
    assert lines_of(events) == ["waiting"]
    assert await log_of(client, job_id) == "waiting\n"
    assert not gate.exists()


async def test_a_job_lost_in_a_crash_counts_the_output_it_logged(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    config = make_config({"gate": [PY, "gate.py", str(tmp_path / "gate")]})
    client = await start(config)
    job_id = await submit(client, "gate")
    await wait_job(client, job_id, {"outputLines": 1})
    await crash(client, config, job_id)

    client = await start(config)
    job = await job_of(client, job_id)
    assert job["status"] == "lost"
    assert (job["outputLines"], job["outputBytes"]) == (1, len("waiting\n"))


async def test_retention_keeps_only_the_newest_jobs(make_config: ConfigFactory, start: ClientFactory) -> None:
    config = make_config({"hello": [PY, "hello.py"]}, server={"retention_jobs": 3})
    client = await start(config)
    ids = []
    for _ in range(5):
        ids.append(await submit(client, "hello"))
        await follow(client, ids[-1])
    kept, gone = ids[2:], ids[:2]

    async def check(client: Client) -> None:
        assert [job["jobId"] for job in await get_data(client, "/api/jobs")] == kept[::-1]
        for job_id in gone:
            for path in (f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/log", f"/api/stream/{job_id}"):
                response = await client.get(path)
                assert response.status == 404, path
                assert (await response.json())["error"]["code"] == "unknown_job"
        for job_id in kept:
            assert lines_of(await follow(client, job_id)) == ["hello", "world"]
        files = {path.name for path in (config.server.data_dir / "jobs").iterdir()}
        assert files == {f"{job_id}.log" for job_id in kept} | {JOURNAL}

    await check(client)
    await client.close()
    await check(await start(config))


async def test_retention_after_a_restart_keeps_the_jobs_that_finished_last_and_forgets_removed_ones(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    tools = {"slow": [PY, "gate.py", str(gate)], "hello": [PY, "hello.py"]}
    config = make_config(tools, server={"retention_jobs": 2})
    client = await start(config)
    slow = await submit(client, "slow")  # made first, finished last
    await wait_job(client, slow, "running")
    quick = []
    for _ in range(2):  # one after the other: they finish in this order
        quick.append(await submit(client, "hello"))
        await follow(client, quick[-1])
    gate.touch()
    await follow(client, slow)
    kept, gone = {slow, quick[1]}, quick[0]

    async def check(client: Client) -> None:
        assert {job["jobId"] for job in await get_data(client, "/api/jobs")} == kept
        assert (await client.get(f"/api/jobs/{gone}")).status == 404
        assert lines_of(await follow(client, slow)) == ["waiting", "released"]

    await check(client)
    await client.close()
    client = await start(config)
    await check(client)
    await client.close()
    # a removed job stays removed, even where retention would now have room for it
    await check(await start(attrs.evolve(config, server=attrs.evolve(config.server, retention_jobs=10))))


async def test_a_finished_job_is_kept_while_newer_jobs_are_unfinished(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    gates = [tmp_path / "gate-a", tmp_path / "gate-b"]
    tools = {"a": [PY, "gate.py", str(gates[0])], "b": [PY, "gate.py", str(gates[1])]}
    client = await start(make_config(tools, queue={"workers": 1}, server={"retention_jobs": 1}))
    first, second = await submit(client, "a"), await submit(client, "b")
    async with client.get(f"/api/stream/{first}") as live:
        events = read_sse(live)
        async for item in events:
            if isinstance(item, Event) and item.event == "output":
                break
        gates[0].touch()
        await wait_job(client, second, "running")  # so the first has finished

        # the only finished job is within retention_jobs = 1
        assert (await job_of(client, first))["status"] == "completed"
        async with asyncio.timeout(10):  # a hang guard: the response should already be over
            rest = [item async for item in events if isinstance(item, Event)]
    assert rest[-1].event == "complete"
    gates[1].touch()
    assert (await follow(client, second))[-1].event == "complete"


async def test_a_torn_log_tail_and_half_written_records_do_not_stop_a_restart(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    config = make_config({"lines": [PY, "lines.py", "12"]})
    client = await start(config)
    job_id = await submit(client, "lines")
    events = await follow(client, job_id)
    job, log = await job_of(client, job_id), await log_of(client, job_id)
    await client.close()

    jobs_dir = config.server.data_dir / "jobs"
    log_path = jobs_dir / f"{job_id}.log"
    size = log_path.stat().st_size
    with log_path.open("ab") as file:
        file.write(TORN_FRAME)
    with (jobs_dir / JOURNAL).open("ab") as journal:
        journal.write(b'{"job_id": "' + str(uuid.uuid4()).encode() + b'", "tool_id": "li')  # a torn last record
    # and what a crash leaves of the older layout (a record per file, written aside then renamed)
    tmp_record = jobs_dir / f"{uuid.uuid4()}.json.tmp"
    tmp_record.write_bytes(b'{"jobId": "' + str(uuid.uuid4()).encode() + b'", "toolId": "li')
    (jobs_dir / f"{uuid.uuid4()}.json").write_bytes(b'{"jobId": "half a rec')

    client = await start(config)
    assert without_duration(await job_of(client, job_id)) == without_duration(job)
    assert await follow(client, job_id) == events
    assert await log_of(client, job_id) == log
    assert log_path.stat().st_size == size  # the torn tail was cut off
    assert not tmp_record.exists()
    assert [j["jobId"] for j in await get_data(client, "/api/jobs")] == [job_id]
    new = await submit(client, "lines")
    assert lines_of(await follow(client, new)) == [f"line {i}" for i in range(12)]


# --- JobStore ---------------------------------------------------------------------------


def test_a_store_records_a_job_and_its_log(tmp_path: Path) -> None:
    store = JobStore(tmp_path, 10)
    assert store.recover() == []
    job = store.add("tool", "proj")
    record = record_of(tmp_path / "jobs", job.job_id)
    assert record["job_id"] == job.job_id and record["status"] == "queued"
    assert not (tmp_path / "jobs" / f"{job.job_id}.log").exists()  # made at its first event
    assert store.get(job.job_id) is job
    assert store.log(job.job_id).last_seq == 0
    with pytest.raises(UnknownJob):
        store.get("nope")
    with pytest.raises(UnknownJob):
        store.log("nope")
    store.close()


def test_recover_returns_queued_jobs_and_ends_running_ones_as_lost(tmp_path: Path) -> None:
    store = JobStore(tmp_path, 10)
    store.recover()
    running, queued, done = store.add("t", "p"), store.add("t", "p"), store.add("t", "p")
    for job in (running, done):
        job.transition(JobStatus.RUNNING)
        store.save(job)
        store.log(job.job_id).append("status", {"status": "running", "timestamp": 1})
        store.log(job.job_id).append("output", {"line": "x", "stream": "stdout", "timestamp": 1})
    done.transition(JobStatus.COMPLETED)
    store.log(done.job_id).append("complete", {"status": "completed"})
    store.save(done)
    store.close()  # no clean end for `running`: the service went away

    again = JobStore(tmp_path, 10)
    assert [job.job_id for job in again.recover()] == [queued.job_id]
    assert again.get(running.job_id).status is JobStatus.LOST
    assert again.get(done.job_id).status is JobStatus.COMPLETED
    kinds = [kind for _, kind, _ in again.log(running.job_id).events()]
    assert kinds == ["status", "output", "status", "complete"]
    assert again.log(running.job_id).finished
    record = record_of(tmp_path / "jobs", running.job_id)
    assert record["status"] == "lost"
    again.close()


def test_a_job_lost_at_a_crash_ends_with_as_many_lines_as_its_tool_keeps(tmp_path: Path) -> None:
    store = JobStore(tmp_path, 10)
    store.recover()
    jobs = {tool: store.add(tool, "p") for tool in ("short", "other")}
    for job in jobs.values():
        job.transition(JobStatus.RUNNING)
        store.save(job)
        store.log(job.job_id).extend_output("stdout", [f"line {i}" for i in range(5)], 1)
    store.close()  # the service went away mid-job

    again = JobStore(tmp_path, 10, max_result_lines=3, tools_result_lines={"short": 2})
    again.recover()
    ends = {tool: list(again.log(job.job_id).events())[-1] for tool, job in jobs.items()}
    assert [kind for _, kind, _ in ends.values()] == ["complete", "complete"]
    assert ends["short"][2]["output"] == ["line 3", "line 4"]
    assert ends["other"][2]["output"] == ["line 2", "line 3", "line 4"]  # a tool no longer configured
    again.close()


def test_recover_keeps_the_order_jobs_came_in_within_one_millisecond(tmp_path: Path) -> None:
    store = JobStore(tmp_path, 100)
    store.recover()
    jobs = [store.add("t", "p") for _ in range(12)]
    for i, job in enumerate(jobs):  # as a burst of submissions is: distinct instants, one millisecond
        job.created_at = 1_700_000_000.0001 + i * 0.00005
        store.save(job)
    store.close()

    again = JobStore(tmp_path, 100)
    assert [job.job_id for job in again.recover()] == [job.job_id for job in jobs]
    assert [job.job_id for job in again.newest()] == [job.job_id for job in reversed(jobs)]
    again.close()


def test_durations_survive_a_restart_unchanged(tmp_path: Path) -> None:
    store = JobStore(tmp_path, 10)
    store.recover()
    job = store.add("t", "p")
    job.transition(JobStatus.RUNNING)
    job.started_at = 1_700_000_000.0009
    job.transition(JobStatus.COMPLETED)
    job.completed_at = 1_700_000_000.0301
    store.save(job)
    before = job.to_json()
    store.close()

    again = JobStore(tmp_path, 10)
    again.recover()
    assert again.get(job.job_id).to_json() == before
    again.close()


def test_prune_removes_the_oldest_finished_jobs_with_their_files(tmp_path: Path) -> None:
    store = JobStore(tmp_path, 2)
    store.recover()
    jobs = [store.add("t", "p") for _ in range(4)]
    for job in jobs:
        job.transition(JobStatus.RUNNING)
        job.transition(JobStatus.COMPLETED)
        store.finish(job, [])
    assert list(store.jobs) == [job.job_id for job in jobs[2:]]
    names = {path.name for path in (tmp_path / "jobs").iterdir()}
    assert names == {f"{job.job_id}.log" for job in jobs[2:]} | {JOURNAL}
    store.close()


def run_one(store: JobStore, to: JobStatus = JobStatus.COMPLETED) -> Job:
    """A job through `store` as the pool takes it, up to `to`."""
    job = store.add("t", "p")
    if to is not JobStatus.QUEUED:
        job.transition(JobStatus.RUNNING)
        store.save(job)
    if to.finished:
        job.transition(to)
        store.finish(job, [])
    return job


@pytest.fixture
def eager_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> JobStore:
    """A store in `tmp_path` that keeps two finished jobs, its journal compacted as soon as
    it holds over four lines a job."""
    monkeypatch.setattr(store_module, "COMPACT_SLACK", 0)
    store = JobStore(tmp_path, 2)
    store.recover()
    return store


def test_the_journal_is_compacted_and_keeps_the_last_record_of_each_job(tmp_path: Path, eager_store: JobStore) -> None:
    store = eager_store
    for _ in range(50):  # three records each: queued, running, completed
        run_one(store)
    journal = (tmp_path / "jobs" / JOURNAL).read_bytes().splitlines()
    assert len(journal) <= store_module.COMPACT_FACTOR * 2 + 3  # 150 records were written
    store.close()
    again = JobStore(tmp_path, 2)
    again.recover()
    assert list(again.jobs) == list(store.jobs)
    assert [job.status for job in again.jobs.values()] == [JobStatus.COMPLETED] * 2
    assert len((tmp_path / "jobs" / JOURNAL).read_bytes().splitlines()) == 2  # rewritten at start
    again.close()


@attrs.define
class HeldWrite:
    """The journal's writes aside, counted; the first one held until `release` is set (a
    disk as slow as the test likes)."""

    entered: threading.Event = attrs.Factory(threading.Event)
    release: threading.Event = attrs.Factory(threading.Event)
    writes: list[int] = attrs.Factory(list)


@pytest.fixture
def held_write(monkeypatch: pytest.MonkeyPatch) -> HeldWrite:
    held = HeldWrite()
    write_aside = store_module.RecordJournal._write_aside

    def first_held(journal: store_module.RecordJournal, blob: bytes) -> None:
        held.writes.append(len(blob))
        if len(held.writes) == 1:
            held.entered.set()
            assert held.release.wait(BOUND_S)
        write_aside(journal, blob)

    monkeypatch.setattr(store_module.RecordJournal, "_write_aside", first_held)
    return held


async def test_a_compaction_writes_the_new_journal_off_the_loop_and_keeps_what_was_appended_meanwhile(
    tmp_path: Path, eager_store: JobStore, held_write: HeldWrite
) -> None:
    store = eager_store
    journal = tmp_path / "jobs" / JOURNAL
    before = journal.stat().st_ino
    for _ in range(5):  # three records a job: the journal outgrows four lines a job
        run_one(store)
    assert await asyncio.to_thread(held_write.entered.wait, BOUND_S)  # the new journal is being written aside ...
    queued, running, ended = run_one(store, JobStatus.QUEUED), run_one(store, JobStatus.RUNNING), run_one(store)
    held_write.release.set()  # ... while the loop went on
    await store.settle()
    assert journal.stat().st_ino != before  # the new journal is in place
    store.close()

    again = JobStore(tmp_path, 2)
    assert [job.job_id for job in again.recover()] == [queued.job_id]
    assert set(again.jobs) <= set(store.jobs)  # the jobs removed meanwhile stay removed
    assert again.get(running.job_id).status is JobStatus.LOST
    assert again.get(ended.job_id).status is JobStatus.COMPLETED
    again.close()


async def test_a_compaction_cancelled_while_its_thread_writes_lets_no_other_begin_until_that_write_ends(
    tmp_path: Path, eager_store: JobStore, held_write: HeldWrite, caplog: pytest.LogCaptureFixture
) -> None:
    """A stopping service cancels its tasks; the thread of a compaction writes on, and a
    second compaction must not share its file aside meanwhile."""
    store = eager_store
    jobs = [run_one(store) for _ in range(5)]
    assert await asyncio.to_thread(held_write.entered.wait, BOUND_S)

    def compactions() -> list[asyncio.Task[Any]]:
        return [task for task in asyncio.all_tasks() if task.get_name() == "journal-compaction"]

    (compaction,) = compactions()
    compaction.cancel()
    await asyncio.wait({compaction})
    jobs += [run_one(store) for _ in range(10)]  # the journal is due again and again ...
    assert not compactions() and len(held_write.writes) == 1  # ... but the first write still runs
    held_write.release.set()
    await store.settle()
    jobs += [run_one(store) for _ in range(2)]  # now the next compaction runs
    await store.settle()
    assert len(held_write.writes) == 2
    store.close()
    again = JobStore(tmp_path, 2)
    again.recover()
    assert list(again.jobs) == [job.job_id for job in jobs[-2:]]
    assert "damaged" not in caplog.text
    again.close()


async def test_a_compaction_whose_write_outlasts_its_backlog_is_given_up_and_loses_nothing(
    tmp_path: Path, eager_store: JobStore, held_write: HeldWrite, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = eager_store
    monkeypatch.setattr(store_module, "COMPACT_BACKLOG", 4)
    journal = tmp_path / "jobs" / JOURNAL
    before = journal.stat().st_ino
    jobs = [run_one(store) for _ in range(5)]
    assert await asyncio.to_thread(held_write.entered.wait, BOUND_S)
    queued = run_one(store, JobStatus.QUEUED)
    jobs += [run_one(store) for _ in range(2)]  # 7 records while the first compaction writes: over its backlog
    held_write.release.set()
    await store.settle()
    assert journal.stat().st_ino == before  # given up: the old journal, with every record, goes on
    jobs.append(run_one(store))  # and the next compaction runs
    await store.settle()
    assert journal.stat().st_ino != before and len(held_write.writes) == 2
    store.close()
    again = JobStore(tmp_path, 2)
    assert [job.job_id for job in again.recover()] == [queued.job_id]
    assert set(again.jobs) == {queued.job_id, *(job.job_id for job in jobs[-2:])}
    again.close()


async def test_a_compaction_that_fails_leaves_the_journal_as_it_was_and_a_later_one_runs(
    tmp_path: Path, eager_store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = eager_store
    write_aside, failed = store_module.RecordJournal._write_aside, asyncio.Event()

    def full_disk(journal: store_module.RecordJournal, blob: bytes) -> None:
        failed.set()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.RecordJournal, "_write_aside", full_disk)
    journal = tmp_path / "jobs" / JOURNAL
    before = journal.stat().st_ino
    jobs = [run_one(store) for _ in range(5)]
    await store.settle()
    assert failed.is_set() and journal.stat().st_ino == before
    monkeypatch.setattr(store_module.RecordJournal, "_write_aside", write_aside)
    jobs += [run_one(store) for _ in range(3)]
    await store.settle()
    assert journal.stat().st_ino != before
    assert len(journal.read_bytes().splitlines()) <= store_module.COMPACT_FACTOR * 2 + 3
    store.close()
    again = JobStore(tmp_path, 2)
    again.recover()
    assert list(again.jobs) == [job.job_id for job in jobs[-2:]]
    again.close()


@attrs.define
class Unwritable:
    """The journal made unwritable for a while, for real: a folder where its file was."""

    path: Path
    kept: bytes = b""

    def __enter__(self) -> None:
        self.kept = self.path.read_bytes()
        self.path.unlink()
        self.path.mkdir()

    def __exit__(self, *_: object) -> None:
        self.path.rmdir()
        self.path.write_bytes(self.kept)


def test_a_record_whose_write_failed_is_written_with_the_next_one(tmp_path: Path) -> None:
    """A job that ended while the disk refused its record must not come back as it was
    before (queued again, or lost) once the disk takes writes again."""
    store = JobStore(tmp_path, 10)
    store.recover()
    ended = run_one(store, JobStatus.RUNNING)
    with Unwritable(tmp_path / "jobs" / JOURNAL):
        ended.transition(JobStatus.COMPLETED)
        store.finish(ended, [])  # logged, not raised
    later = run_one(store, JobStatus.QUEUED)
    store.close()
    again = JobStore(tmp_path, 10)
    assert [job.job_id for job in again.recover()] == [later.job_id]
    assert again.get(ended.job_id).to_json() == ended.to_json()
    again.close()


def test_a_stopping_store_writes_the_records_whose_writes_failed(tmp_path: Path) -> None:
    store = JobStore(tmp_path, 10)
    store.recover()
    ended = run_one(store, JobStatus.RUNNING)
    with Unwritable(tmp_path / "jobs" / JOURNAL):
        ended.transition(JobStatus.FAILED, error="it failed")
        store.finish(ended, [])
    store.close()
    again = JobStore(tmp_path, 10)
    assert again.recover() == []
    assert again.get(ended.job_id).to_json() == ended.to_json()
    again.close()


async def test_a_job_refused_for_a_failed_write_is_never_written(
    tmp_path: Path, eager_store: JobStore, held_write: HeldWrite
) -> None:
    """Not later with another record, nor into a new journal being compacted meanwhile: its
    client was told it was not accepted."""
    store = eager_store
    kept = [run_one(store) for _ in range(5)]
    assert await asyncio.to_thread(held_write.entered.wait, BOUND_S)  # a compaction writes aside
    with Unwritable(tmp_path / "jobs" / JOURNAL), pytest.raises(StorageError):
        store.add("t", "p")
    accepted = run_one(store, JobStatus.QUEUED)
    held_write.release.set()
    await store.settle()
    store.close()
    again = JobStore(tmp_path, 2)
    assert [job.job_id for job in again.recover()] == [accepted.job_id]
    assert set(again.jobs) == {accepted.job_id, *(job.job_id for job in kept[-2:])}
    again.close()


def test_a_log_that_cannot_be_removed_does_not_stop_retention(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A read-only or failing disk: the job is still dropped, its removal recorded."""
    store = JobStore(tmp_path, 1)
    store.recover()
    oldest = run_one(store)
    log_file = tmp_path / "jobs" / f"{oldest.job_id}.log"
    log_file.unlink()
    (log_file / "held").mkdir(parents=True)  # a folder with something in it: unlink fails
    newest = run_one(store)  # retention drops the oldest
    assert list(store.jobs) == [newest.job_id]
    assert f"cannot remove the log of job {oldest.job_id}" in caplog.text
    store.close()
    again = JobStore(tmp_path, 1)
    again.recover()
    assert list(again.jobs) == [newest.job_id]
    again.close()


def test_a_damaged_line_costs_one_record_and_the_old_layout_is_read_and_replaced(tmp_path: Path) -> None:
    store = JobStore(tmp_path, 10)
    store.recover()
    first, second = store.add("t", "p"), store.add("t", "p")
    store.close()
    jobs_dir = tmp_path / "jobs"
    lines = (jobs_dir / JOURNAL).read_bytes().splitlines(keepends=True)
    (jobs_dir / JOURNAL).write_bytes(lines[0][:20] + b"\n" + lines[1])  # the first record damaged mid-file
    legacy = store.add("t", "p")  # a record as the older layout kept it: a file of its own
    (jobs_dir / f"{legacy.job_id}.json").write_text(json.dumps(legacy.to_record()))

    again = JobStore(tmp_path, 10)
    assert [job.job_id for job in again.recover()] == [second.job_id, legacy.job_id]
    assert first.job_id not in again.jobs
    assert not list(jobs_dir.glob("*.json"))  # folded into the journal
    assert record_of(jobs_dir, legacy.job_id)["status"] == "queued"
    again.close()


# --- JobLog -----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(line=st.text(), seq=st.integers(1, 10**12), stream=st.sampled_from(["stdout", "stderr"]))
def test_the_fast_output_encoder_writes_exactly_what_the_general_one_does(line: str, seq: int, stream: str) -> None:
    data = {"line": line, "stream": stream, "timestamp": 1764000000000, "seq": seq}
    frame = encode_output(seq, stream, json_string(line), 1764000000000)
    assert frame == encode_frame(seq, "output", data)
    assert list(parse_frames(frame)) == [(seq, "output", data)]


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(st.text(), max_size=30), status=st.sampled_from(list(JobStatus)[2:]))
def test_a_complete_event_built_from_quoted_lines_holds_exactly_those_lines(
    lines: list[str], status: JobStatus
) -> None:
    job = Job(job_id="j", tool_id="t", project_id="p", started_at=1764000000.0, completed_at=1764000001.5)
    job.status, job.exit_code, job.error = status, 1, 'a "quoted" error'
    [(_, _, status_event), (_, kind, data)] = parse_frames(
        b"".join(
            encode_frame(seq, kind, data)
            for seq, (kind, data) in enumerate(final_events(job, [json_string(line) for line in lines]), 1)
        )
    )
    assert status_event["status"] == status.value
    assert kind == "complete" and data == job.execution_response(lines)


def test_a_complete_event_keeps_the_last_lines_that_fit_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "MAX_RESULT_BYTES", 20)
    lines = ["one", "two", 'a "quoted" one', "last"]  # each counts its characters and one, escapes too: 4, 4, 17, 5
    job = Job(job_id="j", tool_id="t", project_id="p")
    [_, (_, data)] = final_events(job, [json_string(line) for line in lines])
    assert isinstance(data, str) and json.loads(data)["output"] == ["last"]  # 17 + 5 would not fit
    [_, (_, data)] = final_events(job, [json_string(line) for line in lines[1:2] + lines[3:]])
    assert isinstance(data, str) and json.loads(data)["output"] == ["two", "last"]
    monkeypatch.setattr(store_module, "MAX_RESULT_BYTES", 9)
    [_, (_, data)] = final_events(job, [json_string(line) for line in lines[1:2] + lines[3:]])
    assert isinstance(data, str) and json.loads(data)["output"] == ["two", "last"]  # 4 + 5: exactly, as before


def test_events_are_numbered_from_one_and_stored_as_frames(tmp_path: Path) -> None:
    log = make_log(tmp_path / "a.log", ["one", "two", "three"], terminal=True)
    assert log.last_seq == 6 and log.finished
    expected = [
        encode_frame(1, "status", {"status": "running", "timestamp": 1}),
        *(
            encode_frame(seq, "output", {"line": line, "stream": "stdout", "timestamp": 1, "seq": seq})
            for seq, line in ((2, "one"), (3, "two"), (4, "three"))
        ),
        encode_frame(5, "status", {"status": "completed", "timestamp": 2}),
        encode_frame(6, "complete", {"status": "completed"}),
    ]
    assert (tmp_path / "a.log").read_bytes() == b"".join(expected)
    assert [seq for seq, _, _ in log.events()] == [1, 2, 3, 4, 5, 6]
    assert list(log.output_lines()) == ["one", "two", "three"]
    assert list(parse_frames(b"".join(expected))) == list(log.events())


def test_frames_after_returns_whole_frames_within_the_size(tmp_path: Path) -> None:
    log = make_log(tmp_path / "a.log", [f"line {i} " + "x" * i for i in range(10)], terminal=False)
    frames = frames_of((tmp_path / "a.log").read_bytes())
    assert len(frames) == log.last_seq == 11

    assert log.frames_after(0, 10**9) == (b"".join(frames), 11)
    assert log.frames_after(-5, 10**9) == (b"".join(frames), 11)
    assert log.frames_after(11, 10**9) == (b"", 11)
    assert log.frames_after(20, 10**9) == (b"", 20)
    for seq in range(11):
        assert log.frames_after(seq, 0) == (frames[seq], seq + 1)  # at least one frame
        assert log.frames_after(seq, 1) == (frames[seq], seq + 1)
        for count in range(2, 11 - seq + 1):
            size = sum(len(frame) for frame in frames[seq : seq + count])
            assert log.frames_after(seq, size) == (b"".join(frames[seq : seq + count]), seq + count)
            assert log.frames_after(seq, size - 1) == (b"".join(frames[seq : seq + count - 1]), seq + count - 1)
    log.close()


def test_frames_after_reads_the_file_once_the_window_is_trimmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(joblog_module, "MEMORY_WINDOW_BYTES", 512)
    log = JobLog.create(tmp_path / "a.log")
    for i in range(200):
        log.append("output", {"line": f"line {i}", "stream": "stdout", "timestamp": 1})
    frames = frames_of((tmp_path / "a.log").read_bytes())
    assert len(frames) == 200
    assert log._window_start > 0  # the precondition: the oldest frames are no longer in memory

    for seq in range(200):
        assert log.frames_after(seq, 1) == (frames[seq], seq + 1)
    assert log.frames_after(0, 10**9) == (b"".join(frames), 200)
    assert log.frames_after(150, 10**9) == (b"".join(frames[150:]), 200)
    cursor, seen = 0, []
    while cursor < log.last_seq:  # a slow reader catching up in small bites
        blob, cursor = log.frames_after(cursor, 300)
        seen.append(blob)
    assert b"".join(seen) == b"".join(frames)
    assert [data["line"] for _, _, data in log.events()] == [f"line {i}" for i in range(200)]
    log.close()
    assert log.frames_after(0, 10**9) == (b"".join(frames), 200)  # closed: still served


def test_load_cuts_a_torn_tail_of_a_finished_log(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    make_log(path, ["one", "two"], terminal=True).close()
    whole = path.read_bytes()
    with path.open("ab") as file:
        file.write(TORN_FRAME)

    log = JobLog.load(path)
    assert log.last_seq == 5 and log.finished
    assert path.read_bytes() == whole
    assert log.frames_after(0, 10**9) == (whole, 5)
    assert list(log.output_lines()) == ["one", "two"]
    with pytest.raises(RuntimeError):
        log.append("output", {"line": "more", "stream": "stdout", "timestamp": 1})


def test_a_loaded_unfinished_log_continues_its_numbering(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    make_log(path, ["one", "two"], terminal=False).close()
    with path.open("ab") as file:
        file.write(TORN_FRAME)

    log = JobLog.load(path)
    assert log.last_seq == 3 and not log.finished
    assert log.append("error", {"message": "lost"}) == 4
    assert log.finished
    events = list(parse_frames(path.read_bytes()))
    assert [(seq, kind) for seq, kind, _ in events] == [(1, "status"), (2, "output"), (3, "output"), (4, "error")]
    assert list(JobLog.load(path).events()) == events


@pytest.mark.parametrize("content", [b"", TORN_FRAME, b"id: 1\nevent: status\n"], ids=["empty", "torn", "no-end"])
def test_load_of_a_log_without_a_whole_frame_is_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "a.log"
    path.write_bytes(content)
    log = JobLog.load(path)
    assert log.last_seq == 0 and not log.finished
    assert path.read_bytes() == b""
    assert log.frames_after(0, 10**9) == (b"", 0)


def test_load_of_a_missing_log_is_empty(tmp_path: Path) -> None:
    log = JobLog.load(tmp_path / "missing.log")
    assert log.last_seq == 0 and not log.finished and list(log.events()) == []


def test_create_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_bytes(b"old content\n\n")
    log = JobLog.create(path)
    assert log.last_seq == 0 and list(log.events()) == []
    log.append("status", {"status": "running", "timestamp": 1})
    assert path.read_bytes() == encode_frame(1, "status", {"status": "running", "timestamp": 1})
    log.close()


def test_watchers_are_called_after_each_append_until_they_unwatch(tmp_path: Path) -> None:
    log = JobLog.create(tmp_path / "a.log")
    calls: list[tuple[str, int, int, int]] = []

    def reader(name: str) -> Callable[[bytes, int], None]:
        def on_append(frames: bytes, after: int) -> None:
            # called after the append (the events are there), with exactly what a reader at `after` lacks
            assert frames == log.frames_after(after, 1 << 20)[0]
            calls.append((name, after, frames.count(b"\n\n"), log.last_seq))
            if name == "leaving":
                log.unwatch(leaving)  # a watcher may leave from its own call

        return on_append

    first, leaving, gone = reader("first"), reader("leaving"), reader("gone")
    for watcher in (first, leaving, gone):
        log.watch(watcher)
    log.unwatch(gone)  # a reader whose client left before any append
    log.append("status", {"status": "running", "timestamp": 1})
    log.extend_output("stdout", ["a", "b"], 2)
    log.append("complete", {"status": "completed"})
    assert calls == [("first", 0, 1, 1), ("leaving", 0, 1, 1), ("first", 1, 2, 3), ("first", 3, 1, 4)]
    assert log.finished


async def test_an_end_the_file_cannot_take_is_served_from_memory(tmp_path: Path) -> None:
    log = JobLog.create(tmp_path / "a.log")
    log.append("status", {"status": "running", "timestamp": 1})
    on_disk = (tmp_path / "a.log").read_bytes()
    woken: list[int] = []
    log.watch(lambda frames, after: woken.append(log.last_seq))
    log.extend([("complete", {"status": "failed"})], durable=False)
    assert woken == [2] and log.finished
    assert [kind for _, kind, _ in log.events()] == ["status", "complete"]
    assert (tmp_path / "a.log").read_bytes() == on_disk  # nothing half-written


async def test_a_live_subscriber_and_a_late_one_see_the_same_log(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(joblog_module, "MEMORY_WINDOW_BYTES", 4096)  # most of the job is read back from its file
    gate = tmp_path / "gate"
    script = "import os,sys,time\nfor i in range(3000): print(f'a {i}')\nprint('mid', flush=True)\n"
    script += f"while not os.path.exists({str(gate)!r}): time.sleep(0.01)\nfor i in range(3000): print(f'b {{i}}')\n"
    client = await start(make_config({"two-phase": [PY, "-c", script]}))
    job_id = await submit(client, "two-phase")
    await wait_job(client, job_id, {"outputLines": 3001})
    async with client.get(f"/api/stream/{job_id}") as live:
        gate.touch()
        events = await collect(live)
    assert_numbered(events)
    assert lines_of(events) == [f"a {i}" for i in range(3000)] + ["mid"] + [f"b {i}" for i in range(3000)]
    assert await follow(client, job_id) == events
    assert await log_of(client, job_id) == "".join(line + "\n" for line in lines_of(events))


def leave_records(data_dir: Path, *states: JobStatus) -> list[str]:
    """Job records in `data_dir` as a dead service might leave them: one per state, each
    with no log file at all (a damaged data folder)."""
    store = JobStore(data_dir, retention_jobs=10)
    store.recover()
    ids = []
    for state in states:
        job = store.add("hello", "proj")
        if state is not JobStatus.QUEUED:
            job.transition(JobStatus.RUNNING)
        store.save(job)
        store.log(job.job_id).close()
        (data_dir / "jobs" / f"{job.job_id}.log").unlink(missing_ok=True)  # a queued job has none yet anyway
        ids.append(job.job_id)
    return ids


async def test_records_without_their_logs_neither_stop_start_up_nor_hang_streams(
    make_config: ConfigFactory, start: ClientFactory, tmp_path: Path
) -> None:
    config = make_config({"hello": [PY, "hello.py"]})
    running_id, queued_id = leave_records(config.server.data_dir, JobStatus.RUNNING, JobStatus.QUEUED)
    client = await start(config)

    lost = await follow(client, running_id)  # ends, with the contract's terminal event
    assert len(lost) == 2
    assert_ended_lost(lost)
    assert lines_of(await follow(client, queued_id)) == ["hello", "world"]  # accepted, so it runs
    assert (await client.get(f"/api/jobs/{running_id}/log")).status == 200


async def test_a_flood_of_empty_lines_meets_the_output_cap_long_before_the_log_balloons(
    make_config: ConfigFactory, start: ClientFactory
) -> None:
    flood = "import sys\nwhile True: sys.stdout.write('\\n' * 4096)"
    client = await start(make_config({"flood": {"argv": [PY, "-c", flood], "max_output_bytes": 64_000}}))
    job_id = await submit(client, "flood")
    events = await follow(client, job_id)
    assert events[-1].data["status"] == "failed" and events[-1].data["truncated"] is True
    assert len(lines_of(events)) <= 64_000 // MIN_LINE_CHARGE  # an empty line counts for more than 1 byte
    log_file = client.app[STORE].dir / f"{job_id}.log" if client.app is not None else None
    assert log_file is not None and log_file.stat().st_size < 10 * 64_000


def test_a_failing_watcher_costs_the_append_nothing_and_the_others_are_still_called(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = JobLog.create(tmp_path / "a.log")
    seen: list[int] = []

    def broken(frames: bytes, after: int) -> None:
        raise RuntimeError("a bug in one reader")

    log.watch(broken)
    log.watch(lambda frames, after: seen.append(log.last_seq))
    log.append("status", {"status": "running", "timestamp": 1})
    log.append("complete", {"status": "completed"})
    assert seen == [1, 2] and log.finished
    assert [kind for _, kind, _ in log.events()] == ["status", "complete"]
    assert [record.getMessage() for record in caplog.records] == [
        "a.log: a reader's call failed; it is no longer called"
    ]
