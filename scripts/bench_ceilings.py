"""The ceilings of scripts/bench.py: what this machine does without any service in between,
measured in the same run so that figures from different machines compare as fractions.

- a pipe: the flood tool into a Python reader that counts lines (lines/s);
- pipe latency: the latency scenario's paced tools into one asyncio reader (p50/p99/max);
- spawns: `true`, N at a time, from threads (jobs/s); beside it, what a new file costs in
  the folder the services keep their data in (every job's log is one);
- fanout: what is offered, every line to every subscriber at the job's own pace (events/s).

A ceiling is what the machine can do: the rates are the best of CEILING_TRIES runs.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_client import percentile
from bench_report import Result, ms
from bench_targets import Gate

CEILING_TRIES = 3
#: the bound on waiting for the tools to reach their gate
GATE_BOUND_S = 60.0


async def pipe_rate(argv: Sequence[str], gate: Path, lines: int, size: int, scenario: str = "throughput") -> Result:
    """The flood tool `argv` (`lines` of `size` bytes) through a plain pipe into a Python reader."""
    seconds = min([await _pipe_seconds(argv, gate, lines) for _ in range(CEILING_TRIES)])
    metrics = {
        "what": f"the flood tool | a Python reader, best of {CEILING_TRIES}",
        "lines": lines,
        "lines_per_s": round(lines / seconds),
        "mb_per_s": round(lines * size / seconds / 1e6, 1),
    }
    return Result(scenario, "ceiling", metrics)


async def _pipe_seconds(argv: Sequence[str], gate_path: Path, lines: int) -> float:
    """Seconds from the gate's release to the last line read from the pipe."""
    read_end, write_end = os.pipe()
    async with Gate(gate_path) as gate:
        try:
            process = await asyncio.create_subprocess_exec(*argv, stdout=write_end)
        finally:
            os.close(write_end)
        try:
            reading = asyncio.create_task(asyncio.to_thread(_count_lines, read_end))
            await gate.arrivals(1, GATE_BOUND_S)
            started_ns = gate.release()
            counted, ended_ns = await reading
        finally:
            os.close(read_end)
            await process.wait()
    if counted != lines:
        raise RuntimeError(f"the flood tool printed {counted} lines into a pipe, not {lines}")
    return (ended_ns - started_ns) / 1e9


def _count_lines(fd: int) -> tuple[int, int]:
    lines = 0
    while chunk := os.read(fd, 1 << 20):
        lines += chunk.count(b"\n")
    return lines, time.time_ns()


async def pipe_latency(argv: Sequence[str], gate_path: Path, jobs: int) -> Result:
    """`jobs` copies of the paced tool `argv` through plain pipes into one asyncio reader."""
    async with Gate(gate_path) as gate:
        processes = [await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE) for _ in range(jobs)]
        await gate.arrivals(jobs, GATE_BOUND_S)
        gate.release()
        samples = await asyncio.gather(*(_pipe_latencies(process) for process in processes))
    ordered = sorted(latency for found in samples for latency in found)
    metrics = {
        "what": f"{jobs} paced tools | one asyncio reader",
        "p50_ms": ms(percentile(ordered, 0.50)),
        "p99_ms": ms(percentile(ordered, 0.99)),
        "max_ms": ms(ordered[-1] if ordered else None),
    }
    return Result("latency", "ceiling", metrics)


async def _pipe_latencies(process: asyncio.subprocess.Process) -> list[float]:
    assert process.stdout is not None
    found: list[float] = []
    while line := await process.stdout.readline():
        found.append((time.time_ns() - int(line[:19])) / 1e6)
    await process.wait()
    return found


async def spawn_rate(argv: Sequence[str], count: int, concurrency: int, data: Path) -> Result:
    """`count` runs of `argv`, `concurrency` at a time (threads running subprocess.run); and
    the median cost of a new file in `data`."""
    seconds = min([await asyncio.to_thread(_spawn_many, argv, count, concurrency) for _ in range(CEILING_TRIES)])
    file_us = _file_create_us(data)
    metrics = {
        "what": f"{count} x {Path(argv[0]).name}, {concurrency} at a time, best of {CEILING_TRIES}; "
        f"a new file in the data folder: {file_us:g} us",
        "jobs_per_s": round(count / seconds),
        "file_create_us": file_us,
    }
    return Result("jobrate", "ceiling", metrics)


def _file_create_us(folder: Path, count: int = 200) -> float:
    """The median microseconds to create a file in `folder`, write a line and close it. It
    varies: ext4 without a journal skips, one by one, the inodes freed in the last minutes,
    so after a run has removed thousands of files a new one can cost 30x more for a while.
    The files stay (removing them would do just that) until the run's scratch folder goes;
    each call makes its own folder in `folder`."""
    folder.mkdir(exist_ok=True)
    here = Path(tempfile.mkdtemp(dir=folder))
    costs = []
    for i in range(count):
        started = time.perf_counter_ns()
        fd = os.open(here / f"{i}.log", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        os.write(fd, b"x" * 100 + b"\n")
        os.close(fd)
        costs.append(time.perf_counter_ns() - started)
    return round(statistics.median(costs) / 1000, 1)


def _spawn_many(argv: Sequence[str], count: int, concurrency: int) -> float:
    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda _: subprocess.run(argv, check=True), range(count)))
    return time.monotonic() - started


async def offered(subscribers: int, rate: float, scenario: str = "fanout") -> Result:
    """Every line to every subscriber at the job's own pace."""
    metrics = {
        "what": f"{subscribers} subscribers x {rate:g} lines/s offered",
        "events_per_s": round(subscribers * rate),
    }
    return Result(scenario, "ceiling", metrics)
