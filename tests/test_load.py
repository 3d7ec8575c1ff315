"""Load and leaks at the suite's scale: the scenarios of scripts/load.py, run in-process.

The service runs in the test's own process (the `start` fixture), so its open fds are
/proc/self/fd, its RSS /proc/self/status and its asyncio tasks `asyncio.all_tasks()`; the
scenarios close every client connection before they measure. Each compares against a baseline
taken after a warm-up round of the same scenario: fds within +10, tasks +5, RSS +30 MiB, no
child process but the reaper, no job cgroup left. `python scripts/load.py` runs them at full
scale (1000 streams, 1000 jobs of a Python tool, a 50 MB flood) against a service in its own
process; here 500 streams, 200 jobs of `echo` and a 20 MB flood keep the suite quick.

The last two tests hold the memory the service needs to open one old, large job or to end
one job with a wide result.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import ClientFactory, ConfigFactory

from streamsvc.api import REGISTRY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import load

#: (a) subscribers that leave mid-job, this many at once
STREAMS = 500
BATCH = 100
#: (b) short jobs, this many at once
JOBS = 200
CONCURRENCY = 16
#: (c) what the flood job writes: five times the in-memory window of a log, so the silent
#: reader must catch up from the file (`scripts/load.py` runs the issue's full 50 MB)
FLOOD_MB = 20
#: (c, wide lines) enough for a `complete` event of 10 000 lines of 1500 bytes (15 MB); more
#: adds time, not memory: the event holds the last max_result_lines lines
WIDE_MB = 15

pytestmark = pytest.mark.timeout(120)


async def serve(
    start: ClientFactory, make_config: ConfigFactory, *, flood_mb: float = FLOOD_MB, stall_s: float = 60.0
) -> load.Target:
    """The service, in-process, with the scenarios' tools."""
    tools = load.tool_tables(load.flood_lines(flood_mb), short_argv=load.ECHO_ARGV)
    client = await start(make_config(tools, server={"stream_stall_s": stall_s}, queue={"workers": 4}))
    assert client.app is not None
    return load.Target(f"http://127.0.0.1:{client.port}", load.Probe(os.getpid()), client.app[REGISTRY].count)


def assert_ok(report: load.Report) -> None:
    print(report.json_line())  # the numbers, for `pytest -s`
    assert report.problems == []


async def test_streams_that_leave_mid_job_leave_nothing_behind(
    start: ClientFactory, make_config: ConfigFactory
) -> None:
    target = await serve(start, make_config)
    assert_ok(await load.scenario_streams(target, STREAMS, BATCH, warm_up=BATCH))


async def test_short_jobs_leave_nothing_behind(start: ClientFactory, make_config: ConfigFactory) -> None:
    target = await serve(start, make_config)
    assert_ok(await load.scenario_jobs(target, JOBS, CONCURRENCY, warm_up=CONCURRENCY))


async def test_a_silent_subscriber_slows_no_one_and_catches_up_from_the_log(
    start: ClientFactory, make_config: ConfigFactory
) -> None:
    target = await serve(start, make_config)
    report = await load.scenario_flood(target, FLOOD_MB, name="flood-catch-up", stall_s=60.0, expect_cut=False)
    assert_ok(report)
    assert report.metrics["silent"]["silent"] == "caught up"
    assert report.metrics["silent"]["sessions_after_fast"] == 1  # it was still connected, stalled


async def test_a_silent_subscriber_cut_off_at_the_stall_bound_resumes_without_loss(
    start: ClientFactory, make_config: ConfigFactory
) -> None:
    target = await serve(start, make_config, stall_s=2.0)
    report = await load.scenario_flood(target, FLOOD_MB, name="flood-cut-off", stall_s=2.0, expect_cut=True)
    assert_ok(report)
    assert report.metrics["silent"]["silent"] == "cut off and resumed"


async def test_opening_an_old_flood_job_keeps_the_service_small(
    start: ClientFactory, make_config: ConfigFactory
) -> None:
    target = await serve(start, make_config)
    assert_ok(await load.scenario_replay_evicted(target, FLOOD_MB, evict_jobs=70))


async def test_a_flood_of_wide_lines_keeps_the_service_small(tmp_path: Path) -> None:
    # a service of its own: the test process's allocator state (and its clients' parsing of
    # the 15 MB `complete` event) would blur what the service alone costs
    exits: list[int | None] = []
    count = load.flood_lines(WIDE_MB, load.WIDE_WIDTH)
    async with load.service(tmp_path, flood_count=count, width=load.WIDE_WIDTH, exits=exits) as target:
        report = await load.scenario_wide_flood(target, WIDE_MB, warm_up=8)
    assert exits == [0]
    assert_ok(report)


def test_the_stream_checker_sees_every_kind_of_loss() -> None:
    """The checks above are only as good as the checker: it must notice a gap, a duplicate,
    a wrong or missing line, and it must read pings (CRLF) and events cut anywhere."""

    def frame(seq: int, line: str) -> bytes:
        return f'id: {seq}\nevent: output\ndata: {{"line":"{line}","stream":"stdout","seq":{seq}}}\n\n'.encode()

    end = b'id: 4\nevent: complete\ndata: {"status":"completed"}\n\n'
    good = b"retry: 2000\n\n" + frame(1, "a") + b": ping\r\n\r\n" + frame(2, "b") + frame(3, "c") + end
    lines = "abc"
    for size in (1, 7, len(good)):  # any cut of the bytes reads the same
        checker = load.StreamChecker(lambda i: lines[i])
        for at in range(0, len(good), size):
            checker.feed(good[at : at + size])
        assert (checker.problems, checker.lines, checker.last_id, checker.complete) == (
            [],
            3,
            4,
            {"status": "completed"},
        )

    for broken, problem in (
        (frame(1, "a") + frame(3, "c"), "event id 3 (output) after id 1"),
        (frame(1, "a") + frame(1, "a"), "event id 1 (output) after id 1"),
        (frame(1, "a") + frame(2, "x"), "output line 1 is 'x', not 'b'"),
        (frame(1, "a") + end.replace(b"id: 4", b"id: 2") + frame(3, "b"), "event 3 (output) after the terminal event"),
    ):
        checker = load.StreamChecker(lambda i: lines[i])
        checker.feed(broken)
        assert checker.problems[:1] == [problem]

    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    body = load.Dechunker()
    assert b"".join(body.feed(chunked[i : i + 3]) for i in range(0, len(chunked), 3)) == b"hello world"
    assert (body.status, body.ended) == (200, True)
