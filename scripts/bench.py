"""Benchmark of streamsvc against the Node seed and this machine's ceilings (issue 5).

    python scripts/bench.py                          # the whole run (make bench)
    python scripts/bench.py --quick                  # a reduced run
    python scripts/bench.py --scenario fanout --no-peer
    python scripts/bench.py --profile /tmp/prof      # + a py-spy profile of streamsvc per scenario

Everything runs on 127.0.0.1, bounded in count and time; each scenario gets a freshly started
service (and Node seed, when node and npm are present), and prints one JSON line per service
and a human line. The jobs run the bench tool (`scripts/bench_tool.c` built with cc, else
`scripts/bench_tool.py`: the same bytes), whose lines begin with their own print time
(`time.time_ns()`): latency is receive time minus print time. The tool waits at a gate until
every subscriber is connected (the seed drops output nobody is subscribed to yet).

- throughput: one job, 200,000 lines of 100 B flat out, one subscriber: lines/s end to end
  (gate release to the last line received); every line must arrive, in order.
- latency: 50 jobs at once, one line per ms for 2 s each, one subscriber each: p50/p99/max.
- fanout: one job, 10,000 lines at 5,000 lines/s, 200 subscribers: how many got every line,
  delivered events/s, p99 latency (of the lines in every 10th chunk a subscriber reads).
- jobrate: 500 jobs of `true`, 16 clients each submitting one and following it over SSE to
  `complete`: jobs/s, p50/p99 submit to complete, lost (no `complete` and a quiet stream for 5 s).
- idle: 2,000 streams open on one running job: the service's RSS per stream (VmRSS after minus
  before, over the count).
- ceilings: the same tool through a plain pipe into a Python reader (lines/s; p99 of 50 paced
  tools), and spawns/s of `true` 16 at a time. Every figure is also given as a fraction of its
  ceiling: rate / ceiling, or ceiling latency / latency. Jobrate also measures a bare job
  server (`scripts/bench_bare.py`: spawn, then `complete`; no log, records or confinement)
  with the same client: what these cores allow any aiohttp job server.
- growth: throughput against line size, fanout against subscribers (a 2,000-line job), memory
  against open streams.

The client side reads in bulk (bare sockets in one epoll loop, each chunk cut at its last
newline and parsed with a few regular expressions) in worker processes: one for up to 50
streams, up to --client-procs for more (see scripts/bench_client.py), each reporting its CPU
time beside the service's, so a reader sees which side was busy. On a shared machine the
figures are noisy: compare runs, and the service's CPU per line and per job (steadier).
Results: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import bench_ceilings as ceilings
from bench_client import (
    ClientProcesses,
    JobsWork,
    StreamPlan,
    StreamResult,
    latencies_ms,
    percentile,
    spread,
)
from bench_report import Result, machine, ms, tables
from bench_targets import (
    PROJECT,
    PY,
    Gate,
    Target,
    Tools,
    describe_source,
    machine_busy_s,
    node_seed,
    py_spy,
    scratch_folder,
    serve,
    tool_argv,
    tool_command,
)

#: streams per client process before another process is added
STREAMS_PER_PROCESS = 50
#: the bound on waiting for the tools of a round to reach their gate
GATE_BOUND_S = 60.0
#: how long the idle scenario lets memory settle before it reads RSS
SETTLE_S = 1.0
STREAMS_NOFILE = 16384


@dataclass(frozen=True)
class Settings:
    """The sizes of a run (the issue's; `--quick` shrinks them)."""

    throughput_lines: int = 200_000
    line_size: int = 100
    latency_jobs: int = 50
    latency_rate: float = 1000.0
    latency_s: float = 2.0
    fanout_subscribers: int = 200
    fanout_lines: int = 10_000
    fanout_rate: float = 5000.0
    jobrate_jobs: int = 500
    jobrate_clients: int = 16
    idle_streams: int = 2000
    spawn_concurrency: int = 16
    growth_sizes: tuple[int, ...] = (10, 100, 1000, 10_000)
    #: a growth round of large lines stops at this many bytes
    growth_bytes: int = 50_000_000
    growth_subscribers: tuple[int, ...] = (1, 10, 100, 1000)
    growth_fanout_lines: int = 2000
    growth_streams: tuple[int, ...] = (100, 1000, 5000)

    def flood_lines(self, size: int) -> int:
        return min(self.throughput_lines, self.growth_bytes // size)


QUICK = Settings(
    throughput_lines=50_000,
    latency_jobs=20,
    latency_s=1.0,
    fanout_subscribers=50,
    fanout_lines=2000,
    jobrate_jobs=200,
    idle_streams=500,
    growth_bytes=10_000_000,
    growth_subscribers=(1, 10, 100),
    growth_fanout_lines=1000,
    growth_streams=(100, 1000),
)


@dataclass
class Delivery:
    """What the subscribers of a round got."""

    streams: list[StreamResult]
    started_ns: int
    service_cpu_s: float
    client_cpu_s: float
    problems: list[str]

    @property
    def lines(self) -> int:
        return sum(stream.lines for stream in self.streams)

    @property
    def seconds(self) -> float:
        ended = max((stream.last_line_ns for stream in self.streams), default=0)
        return max(ended - self.started_ns, 1) / 1e9

    @property
    def whole(self) -> int:
        """Subscribers that got every line, in order, once."""
        return sum(1 for stream in self.streams if stream.in_order)

    def common(self) -> dict[str, Any]:
        ordered = latencies_ms(self.streams)
        return {
            "seconds": round(self.seconds, 3),
            "lines_received": self.lines,
            "subscribers": len(self.streams),
            "whole": self.whole,
            "completes": sum(1 for stream in self.streams if stream.complete),
            "p50_ms": ms(percentile(ordered, 0.50)),
            "p99_ms": ms(percentile(ordered, 0.99)),
            "max_ms": ms(ordered[-1] if ordered else None),
            "latency_samples": len(ordered),
            "service_cpu_s": round(self.service_cpu_s, 2),
            "client_cpu_s": round(self.client_cpu_s, 2),
            # what a delivered line costs the service: steadier than a rate on a busy machine
            "service_cpu_us_per_event": round(self.service_cpu_s * 1e6 / max(self.lines, 1), 2),
        }

    def lost(self) -> list[str]:
        missing = len(self.streams) - self.whole
        found = list(self.problems)
        if missing:
            found.append(f"{missing} of {len(self.streams)} subscribers missed lines or got them out of order")
        return found


class Bench:
    """One run: its settings, scratch folder, services, ceilings and results."""

    def __init__(
        self, settings: Settings, scratch: Path, tool: list[str], node_dir: Path | None, args: argparse.Namespace
    ) -> None:
        self.settings = settings
        self.scratch = scratch
        self.tool = tool
        self.node_dir = node_dir
        self.max_processes: int = args.client_procs
        self.profile_dir: Path | None = args.profile
        self.source: Path | None = args.streamsvc_src
        self.run_as: str = args.run_as
        self.python: str = args.streamsvc_python or PY
        self.targets = ["streamsvc"] + (["node"] if node_dir is not None else [])
        self.results: list[Result] = []
        self.ceilings: dict[str, Result] = {}
        self._rounds = 0
        (scratch / "gates").mkdir()

    def tools(self) -> Tools:
        s = self.settings
        sizes = sorted({s.line_size, *s.growth_sizes})
        found: dict[str, list[str]] = {
            f"flood-{size}": tool_argv(self.tool, s.flood_lines(size), size, gate=self.gate_path(f"flood-{size}"))
            for size in sizes
        }
        paced = {
            "paced-latency": (round(s.latency_rate * s.latency_s), s.latency_rate),
            "paced-fanout": (s.fanout_lines, s.fanout_rate),
            "paced-growth": (s.growth_fanout_lines, s.fanout_rate),
        }
        for tool, (count, rate) in paced.items():
            found[tool] = tool_argv(self.tool, count, s.line_size, rate=rate, gate=self.gate_path(tool))
        found["hold"] = tool_argv(self.tool, 0, s.line_size, gate=self.gate_path("hold"))
        found["true"] = [shutil.which("true") or "/bin/true"]
        return found

    def gate_path(self, tool: str) -> Path:
        return self.scratch / "gates" / f"{tool}.sock"

    def pipe_ceiling(self, size: int | None = None, scenario: str = "throughput") -> Callable[[], Awaitable[Result]]:
        """The pipe ceiling of the flood tool of `size`-byte lines."""
        size = size or self.settings.line_size
        tool = f"flood-{size}"
        lines = self.settings.flood_lines(size)
        return partial(ceilings.pipe_rate, self.tools()[tool], self.gate_path(tool), lines, size, scenario)

    def processes_for(self, streams: int) -> int:
        return max(1, min(self.max_processes, math.ceil(streams / STREAMS_PER_PROCESS)))

    @contextlib.asynccontextmanager
    async def service(self, kind: str, scenario: str) -> AsyncIterator[Target]:
        """A fresh service of `kind` for one scenario (profiled when asked)."""
        self._rounds += 1
        folder = self.scratch / f"{self._rounds:03d}-{scenario}-{kind}"
        options = {"run_as": self.run_as, "python": self.python} if kind == "streamsvc" else {}
        async with serve(kind, folder, self.tools(), node_dir=self.node_dir, source=self.source, **options) as target:
            if self.profile_dir is not None and kind == "streamsvc":
                async with py_spy(target.proc.pid, self.profile_dir / f"{scenario}.txt"):
                    yield target
            else:
                yield target

    def emit(self, result: Result) -> None:
        self.results.append(result)
        print(json.dumps(result.json_line(self.ceilings.get(result.scenario))), flush=True)
        print(result.summary(), flush=True)

    async def compare(
        self,
        scenario: str,
        measure: Callable[[Target], Awaitable[Result]],
        ceiling: Callable[[], Awaitable[Result]] | None = None,
        also: Sequence[str] = (),
    ) -> None:
        """The ceiling of `scenario` (if any), then `measure` on a fresh service of each target
        and of the kinds `also` names."""
        if ceiling is not None:
            self.ceilings[scenario] = await ceiling()
            self.emit(self.ceilings[scenario])
        for kind in [*self.targets, *also]:
            load = os.getloadavg()[0]  # other work on the machine skews every figure: say how much
            try:
                async with self.service(kind, scenario) as target:
                    result = await measure(target)
            except (RuntimeError, OSError, TimeoutError, aiohttp.ClientError) as exc:
                result = Result(scenario, kind, {}, [f"the round failed: {exc!r}"])
            result.metrics["loadavg_before"] = round(load, 2)
            self.emit(result)


# --- the shared measurement -------------------------------------------------------------


async def deliver(
    bench: Bench,
    target: Target,
    tool: str,
    *,
    jobs: int,
    subscribers: int,
    lines: int,
    stamped: bool = True,
    sample_every: int = 1,
    full_check: bool = True,
) -> Delivery:
    """Submit `jobs` jobs of the gated `tool`, connect `subscribers` streams to each (in client
    processes), release the tools once every stream is connected and every tool waits, and
    collect what each stream got."""
    async with Gate(bench.gate_path(tool)) as gate, aiohttp.ClientSession() as session:
        job_ids = await asyncio.gather(*(target.submit(session, tool) for _ in range(jobs)))
        plans = [
            StreamPlan(target.stream_url(job_id), lines, stamped, sample_every, full_check)
            for job_id in job_ids
            for _ in range(subscribers)
        ]
        async with ClientProcesses(spread(plans, bench.processes_for(len(plans)))) as clients:
            connected, problems = await clients.ready()
            if not await gate.arrivals(jobs, GATE_BOUND_S):
                problems.append(f"only {gate.waiting} of {jobs} jobs started within {GATE_BOUND_S:g} s")
            if connected < len(plans):
                problems.append(f"only {connected} of {len(plans)} subscribers connected")
            service_cpu = target.proc.cpu_s()
            clients.go()
            started_ns = gate.release()
            reports = await clients.results()
            service_cpu = target.proc.cpu_s() - service_cpu
    streams = [stream for report in reports for stream in report.results]
    problems += sorted({error for report in reports for error in report.errors})[:5]
    client_cpu = sum(report.cpu_s for report in reports)
    return Delivery(streams, started_ns, service_cpu, client_cpu, problems)


# --- the scenarios ------------------------------------------------------------------------


async def throughput(bench: Bench, target: Target, *, size: int, scenario: str = "throughput") -> Result:
    lines = bench.settings.flood_lines(size)
    stamped = size >= 32
    got = await deliver(
        bench, target, f"flood-{size}", jobs=1, subscribers=1, lines=lines, stamped=stamped, sample_every=0
    )
    metrics = got.common() | {
        "line_bytes": size,
        "lines": lines,
        "lines_per_s": round(got.lines / got.seconds),
        "mb_per_s": round(got.lines * size / got.seconds / 1e6, 1),
    }
    return Result(scenario, target.kind, metrics, got.lost())


async def latency(bench: Bench, target: Target) -> Result:
    s = bench.settings
    lines = round(s.latency_rate * s.latency_s)
    got = await deliver(bench, target, "paced-latency", jobs=s.latency_jobs, subscribers=1, lines=lines)
    metrics = got.common() | {"jobs": s.latency_jobs, "lines_per_job": lines, "rate_per_job": s.latency_rate}
    return Result("latency", target.kind, metrics, got.lost())


async def fanout(
    bench: Bench, target: Target, *, subscribers: int, lines: int, tool: str, scenario: str = "fanout"
) -> Result:
    got = await deliver(
        bench, target, tool, jobs=1, subscribers=subscribers, lines=lines, sample_every=10, full_check=False
    )
    metrics = got.common() | {
        "lines": lines,
        "rate": bench.settings.fanout_rate,
        "events_per_s": round(got.lines / got.seconds),
        "client_processes": bench.processes_for(subscribers),
    }
    return Result(scenario, target.kind, metrics, got.lost())


async def jobrate(bench: Bench, target: Target) -> Result:
    s = bench.settings
    processes = max(1, min(bench.max_processes, 2, s.jobrate_clients))
    works = [
        JobsWork(target.base, "true", PROJECT, len(range(i, s.jobrate_jobs, processes)), clients)
        for i, clients in enumerate(_shares(s.jobrate_clients, processes))
    ]
    async with ClientProcesses(works) as clients:
        _, problems = await clients.ready()
        service_cpu, tools_cpu, machine_cpu = target.proc.cpu_s(), target.proc.children_cpu_s(), machine_busy_s()
        clients.go()
        started_ns = time.time_ns()
        reports = await clients.results()
        service_cpu = target.proc.cpu_s() - service_cpu
        tools_cpu = target.proc.children_cpu_s() - tools_cpu
        machine_cpu = machine_busy_s() - machine_cpu
    runs: list[tuple[int, int]] = [run for report in reports for run in report.results]
    client_cpu = sum(report.cpu_s for report in reports)

    def per_job(cpu_s: float) -> float:
        return round(cpu_s * 1000 / max(len(runs), 1), 2)

    done = sorted((end - start) / 1e6 for start, end in runs if end)
    lost = len(runs) - len(done)
    seconds = max((end for _, end in runs), default=started_ns + 1) / 1e9 - started_ns / 1e9
    problems += sorted({error for report in reports for error in report.errors})[:5]
    if lost or len(runs) < s.jobrate_jobs:
        problems.append(f"{lost + s.jobrate_jobs - len(runs)} of {s.jobrate_jobs} jobs lost (no `complete` seen)")
    metrics = {
        "jobs": s.jobrate_jobs,
        "clients": s.jobrate_clients,
        "completes": len(done),
        "lost": lost,
        "seconds": round(seconds, 3),
        "jobs_per_s": round(len(done) / seconds),
        "p50_ms": ms(percentile(done, 0.50)),
        "p99_ms": ms(percentile(done, 0.99)),
        "service_cpu_s": round(service_cpu, 2),
        "client_cpu_s": round(client_cpu, 2),
        # where the machine's CPU went, a job: at 1,000 jobs/s two cores have 2 ms for all
        "service_cpu_ms_per_job": per_job(service_cpu),
        "client_cpu_ms_per_job": per_job(client_cpu),
        # the tools' CPU (as their service counts it once it has waited for them), and the
        # whole machine's: the rest is the kernel's own threads and what else ran
        "tools_cpu_ms_per_job": per_job(tools_cpu),
        "machine_cpu_ms_per_job": per_job(machine_cpu),
    }
    return Result("jobrate", target.kind, metrics, problems)


def _shares(total: int, parts: int) -> list[int]:
    return [len(range(i, total, parts)) for i in range(parts)]


async def idle(bench: Bench, target: Target, *, streams: int, scenario: str = "idle") -> Result:
    """`streams` open streams on one running (silent) job: the service's RSS per stream."""
    problems: list[str] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with Gate(bench.gate_path("hold")) as gate, aiohttp.ClientSession(connector=connector) as session:
        job_id = await target.submit(session, "hold")
        if not await gate.arrivals(1, GATE_BOUND_S):
            problems.append("the job did not start")
        await asyncio.sleep(SETTLE_S)
        before = target.proc.rss_kib()
        responses: list[aiohttp.ClientResponse] = []
        try:
            for first in range(0, streams, 100):
                batch = [session.get(target.stream_url(job_id)) for _ in range(min(100, streams - first))]
                responses += await asyncio.gather(*batch)
            await asyncio.sleep(SETTLE_S)
            after = target.proc.rss_kib()
        finally:
            for response in responses:
                response.close()
    opened = sum(1 for response in responses if response.status == 200)
    if opened < streams:
        problems.append(f"only {opened} of {streams} streams opened")
    metrics = {
        "streams": streams,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_stream": round((after - before) / max(opened, 1), 2),
    }
    return Result(scenario, target.kind, metrics, problems)


# --- the plan -----------------------------------------------------------------------------


async def run_throughput(bench: Bench) -> None:
    await bench.compare("throughput", partial(throughput, bench, size=bench.settings.line_size), bench.pipe_ceiling())


async def run_latency(bench: Bench) -> None:
    s = bench.settings
    ceiling = partial(ceilings.pipe_latency, bench.tools()["paced-latency"], bench.gate_path("paced-latency"))
    await bench.compare("latency", partial(latency, bench), partial(ceiling, s.latency_jobs))


async def run_fanout(bench: Bench) -> None:
    s = bench.settings
    measure = partial(fanout, bench, subscribers=s.fanout_subscribers, lines=s.fanout_lines, tool="paced-fanout")
    await bench.compare("fanout", measure, partial(ceilings.offered, s.fanout_subscribers, s.fanout_rate))


async def run_jobrate(bench: Bench) -> None:
    s = bench.settings
    files = bench.scratch / "file-create"  # beside the services' data folders
    ceiling = partial(ceilings.spawn_rate, bench.tools()["true"], s.jobrate_jobs, s.spawn_concurrency, files)
    await bench.compare("jobrate", partial(jobrate, bench), ceiling, also=["bare"])


async def run_idle(bench: Bench) -> None:
    await bench.compare("idle", partial(idle, bench, streams=bench.settings.idle_streams))


async def run_growth_size(bench: Bench) -> None:
    for size in bench.settings.growth_sizes:
        name = f"growth-size-{size}"
        await bench.compare(name, partial(throughput, bench, size=size, scenario=name), bench.pipe_ceiling(size, name))


async def run_growth_fanout(bench: Bench) -> None:
    s = bench.settings
    for count in s.growth_subscribers:
        name = f"growth-fanout-{count}"
        measure = partial(
            fanout, bench, subscribers=count, lines=s.growth_fanout_lines, tool="paced-growth", scenario=name
        )
        await bench.compare(name, measure, partial(ceilings.offered, count, s.fanout_rate, name))


async def run_growth_memory(bench: Bench) -> None:
    for count in bench.settings.growth_streams:
        name = f"growth-memory-{count}"
        await bench.compare(name, partial(idle, bench, streams=count, scenario=name))


SCENARIOS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "throughput": run_throughput,
    "latency": run_latency,
    "fanout": run_fanout,
    "jobrate": run_jobrate,
    "idle": run_idle,
    "growth-size": run_growth_size,
    "growth-fanout": run_growth_fanout,
    "growth-memory": run_growth_memory,
}


def raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < limit:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


async def run(args: argparse.Namespace) -> Bench:
    settings = QUICK if args.quick else Settings()
    with scratch_folder() as tmp:
        scratch = Path(tmp)
        node_dir, note = (
            (None, "--no-peer: the Node seed is not measured") if args.no_peer else node_seed(args.node_dir, scratch)
        )
        tool, tool_note = tool_command(args.tool, scratch)
        if args.run_as:
            os.chmod(scratch, 0o711)  # the tools' user reaches the job tool and the gates by path
            note += f"; streamsvc's tools run as {args.run_as}"
        if args.streamsvc_python:
            note += f"; streamsvc runs on {args.streamsvc_python}"
        print(f"bench: {machine()}; {describe_source(args.streamsvc_src)}; {tool_note}; {note}", flush=True)
        bench = Bench(settings, scratch, tool, node_dir, args)
        for name in args.scenario or list(SCENARIOS):
            await SCENARIOS[name](bench)
    return bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    choices = [*SCENARIOS, "growth"]
    parser.add_argument("--scenario", action="append", choices=choices, help="run only this one (repeatable)")
    parser.add_argument("--quick", action="store_true", help="a reduced run")
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument("--no-peer", action="store_true", help="measure streamsvc only")
    peer.add_argument("--peer", choices=["node"], help="also measure the Node seed (the default when node is present)")
    parser.add_argument(
        "--node-dir", help="a seed-node copy with node_modules (default: $BENCH_NODE_DIR, else install one)"
    )
    parser.add_argument(
        "--tool",
        choices=["auto", "c", "python"],
        default="auto",
        help="the job tool's build (auto: C when cc is present)",
    )
    parser.add_argument(
        "--streamsvc-src",
        type=Path,
        help="a folder holding the streamsvc package to measure (default: the installed one)",
    )
    parser.add_argument(
        "--streamsvc-python", help="the Python that runs streamsvc, with its dependencies (default: this one)"
    )
    parser.add_argument("--client-procs", type=int, default=4, help="client processes at most (default 4)")
    parser.add_argument(
        "--run-as",
        default="",
        metavar="USER",
        help="run streamsvc's tools as this user (its server.run_as; the bench must run as root)",
    )
    parser.add_argument(
        "--profile", type=Path, help="write a py-spy profile of streamsvc per scenario into this folder"
    )
    parser.add_argument("--time-limit", type=float, default=1800.0, help="give up after this many seconds")
    args = parser.parse_args(argv)
    if args.scenario and "growth" in args.scenario:
        args.scenario = [name for name in args.scenario if name != "growth"]
        args.scenario += [name for name in SCENARIOS if name.startswith("growth-") and name not in args.scenario]
    if args.client_procs < 1:
        parser.error("--client-procs must be at least 1")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    raise_nofile(STREAMS_NOFILE)

    started = time.monotonic()
    try:
        bench = asyncio.run(asyncio.wait_for(run(args), args.time_limit))
    except TimeoutError:
        print(f"bench: the run did not finish within {args.time_limit:g} s", file=sys.stderr)
        return 1
    print()
    print(tables(bench.results, bench.ceilings))
    failed = [r.scenario for r in bench.results if r.target == "streamsvc" and r.problems]
    verdict = "streamsvc lost nothing" if not failed else "streamsvc FAILED in " + ", ".join(failed)
    print(f"\nbench: {verdict}; {time.monotonic() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
