"""The job queue: N asyncio workers over a bounded, ordered queue of accepted jobs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

from .clients import ClientQuotas
from .config import Config, ToolConfig
from .errors import JobFinished, QueueFull, ShuttingDown, UnknownTool
from .metrics import Metrics
from .models import Job, JobStatus
from .projects import Projects
from .runner import REAP_BOUND_S, Outcome, Run, RunSpec, Sink
from .sandbox import Sandbox
from .store import LOST_MESSAGE, JobStore, end_log, final_events, now_ms

log = logging.getLogger(__name__)

#: finished jobs whose durations feed the wait estimate
RECENT_DURATIONS = 50


class WorkerPool:
    """Owns every job from acceptance to its end: the queue, the workers, the runs."""

    def __init__(self, config: Config, store: JobStore, projects: Projects, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.store = store
        self.projects = projects
        self.sandbox = Sandbox({}, None)
        self._pending: dict[str, Job] = {}
        self._runs: dict[str, Run] = {}
        #: one future per idle worker: a new job wakes one worker, not all of them
        self._idle: deque[asyncio.Future[None]] = deque()
        self._workers: list[asyncio.Task[None]] = []
        self._closing = False
        self._durations_ms: deque[int] = deque(maxlen=RECENT_DURATIONS)
        self.quotas = ClientQuotas(config.clients)
        self.finished_counts = {status: 0 for status in JobStatus if status.finished}

    async def start(self) -> None:
        self.sandbox = Sandbox.detect(self.config.server.run_as)
        for job in self.store.recover():
            self._pending[job.job_id] = job
            self.quotas.hold(job.client)
        for job in self.store.jobs.values():
            if job.status.finished:
                self.finished_counts[job.status] += 1
        self._workers = [
            asyncio.create_task(self._worker(), name=f"worker-{i}") for i in range(self.config.queue.workers)
        ]

    def close(self) -> None:
        """Accept no more jobs and start no more (the service is shutting down)."""
        self._closing = True
        while self._idle:
            self._wake_one()

    async def stop(self) -> None:
        """Accept nothing more; end running jobs as `lost` (their group killed); queued jobs
        stay queued on disk and run after a restart. A second call does nothing more."""
        self.close()
        for run in self._runs.values():
            run.stop(JobStatus.LOST, LOST_MESSAGE)
        grace = max((run.spec.limits.kill_grace_s for run in self._runs.values()), default=0)
        if self._workers:  # a run ends within 2 graces and REAP_BOUND_S, however its tree behaves
            await asyncio.wait(self._workers, timeout=2 * grace + REAP_BOUND_S + 2)
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self.sandbox.close()

    def submit(self, tool_id: str, project_id: str, client: str = "") -> Job:
        """Accept a job: checked now (unknown tool or project, full queue, the client's
        limits), run later."""
        if self._closing:
            raise ShuttingDown()
        self.tool(tool_id)
        self.projects.resolve(project_id)
        if len(self._pending) >= self.config.queue.max_pending:
            raise QueueFull(len(self._pending), self._retry_after_s())
        self.quotas.admit(client)
        try:
            job = self.store.add(tool_id, project_id, client)
        except Exception:
            self.quotas.release(client, refund=True)
            raise
        self._pending[job.job_id] = job
        self._wake_one()
        self.metrics.submitted()
        log.info(
            "job %s queued: tool=%s project=%s",
            job.job_id,
            tool_id,
            project_id,
            extra={"jobId": job.job_id, "status": "queued", "toolId": tool_id, "projectId": project_id},
        )
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job.status.finished:
            raise JobFinished(job_id, job.status.value)
        if job.job_id in self._pending:
            del self._pending[job.job_id]
            self._finish(job, Outcome(JobStatus.CANCELLED, error="cancelled before it started"), output=())
        elif job.job_id in self._runs:
            self._runs[job.job_id].stop(JobStatus.CANCELLED, "cancelled while running")
        return job

    def tool(self, tool_id: str) -> ToolConfig:
        try:
            return self.config.tools[tool_id]
        except (KeyError, TypeError):
            raise UnknownTool(tool_id) from None

    def positions(self) -> dict[str, int]:
        """Each queued job's 1-based place in the queue."""
        return {job_id: place for place, job_id in enumerate(self._pending, start=1)}

    def estimated_wait_ms(self, position: int) -> int:
        """The origin design's estimate: whole waves of `workers` jobs of recent mean length."""
        workers = self.config.queue.workers
        if position <= workers - len(self._runs):
            return 0
        mean = sum(self._durations_ms) / len(self._durations_ms) if self._durations_ms else 0
        return round(math.ceil(position / workers) * mean)

    def job_json(self, job: Job, positions: dict[str, int] | None = None) -> dict[str, Any]:
        """The API's Job; pass `positions()` when serving many jobs at once."""
        if positions is None and job.status is JobStatus.QUEUED:
            positions = self.positions()
        position = (positions or {}).get(job.job_id)
        wait = self.estimated_wait_ms(position) if position is not None else None
        data = job.to_json(position, wait)
        if (run := self._runs.get(job.job_id)) is not None:  # running: its bytes so far, as its lines
            data["outputBytes"] = run.output_bytes
        return data

    def status(self) -> dict[str, Any]:
        position = len(self._pending) + 1
        wait_ms = self.estimated_wait_ms(position)
        counts = {
            status.value: self.finished_counts[status]
            for status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMEOUT)
        }
        return {
            "concurrency": self.config.queue.workers,
            "running": len(self._runs),
            "pending": len(self._pending),
            "maxPending": self.config.queue.max_pending,
            "position": position,
            "estimatedWaitMs": wait_ms,
            "estimatedWaitSec": math.ceil(wait_ms / 1000),
        } | counts

    def _wake_one(self) -> None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():  # (a cancelled worker's is done)
                waiter.set_result(None)
                return

    async def _worker(self) -> None:
        while not self._closing:
            if not self._pending:
                waiter = asyncio.get_running_loop().create_future()
                self._idle.append(waiter)
                await waiter
                continue
            job = self._pending.pop(next(iter(self._pending)))
            try:
                await self._run(job)
            except Exception:  # a bug must cost one job, never a worker
                log.exception("job %s: internal error", job.job_id)
                with contextlib.suppress(Exception):
                    if job.status is JobStatus.RUNNING:
                        self._finish(job, Outcome(JobStatus.FAILED, error="internal error"), output=())
                    elif not (joblog := self.store.log(job.job_id)).finished:
                        end_log(joblog, final_events(job, ()))  # it reached its end; its streams must too

    async def _run(self, job: Job) -> None:
        tool = self.config.tools.get(job.tool_id)
        joblog = self.store.log(job.job_id)
        tail: deque[str] = deque(maxlen=self.store.result_lines(job.tool_id))

        def sink(stream: str, lines: list[str]) -> None:
            tail.extend(joblog.extend_output(stream, lines, now_ms()))
            job.output_lines += len(lines)

        job.transition(JobStatus.RUNNING)
        self.store.save(job)
        self.metrics.started(job)
        log.info("job %s running", job.job_id, extra={"jobId": job.job_id, "status": "running"})
        try:
            joblog.append("status", {"status": "running", "timestamp": now_ms()})
        except (OSError, RuntimeError) as exc:
            outcome = Outcome(JobStatus.FAILED, error=f"cannot write the job log: {exc}")
        else:
            outcome = await self._execute(job, tool, sink)
        self._finish(job, outcome, tail)

    async def _execute(self, job: Job, tool: ToolConfig | None, sink: Sink) -> Outcome:
        if tool is None:  # the tool left the config between two runs of the service
            return Outcome(JobStatus.FAILED, error=f"tool {job.tool_id!r} is no longer configured")
        try:
            folder = self.projects.resolve(job.project_id)
        except Exception:
            return Outcome(JobStatus.FAILED, error=f"project {job.project_id!r} no longer exists")
        workdir = folder if tool.cwd == "." else (folder / tool.cwd).resolve()
        if not workdir.is_relative_to(folder):
            return Outcome(JobStatus.FAILED, error=f"the tool's cwd {tool.cwd!r} leads out of the project")
        spec = RunSpec(tool.argv, workdir, RunSpec.clean_env(dict(tool.env)), tool.limits)
        run = Run(spec, self.sandbox, sink)
        self._runs[job.job_id] = run
        try:
            outcome = await run.execute()
        finally:
            del self._runs[job.job_id]
        job.output_bytes = run.output_bytes
        return outcome

    def _finish(self, job: Job, outcome: Outcome, output: Sequence[str]) -> None:
        """End the job: its record, its client's quota and its log (its streams) first, so
        that a fault in the bookkeeping after them cannot leave a stream without its end."""
        job.exit_code, job.signal, job.truncated = outcome.exit_code, outcome.signal, outcome.truncated
        job.transition(outcome.status, error=outcome.error)
        self.quotas.release(job.client)
        self.store.finish(job, output)
        if job.duration_ms is not None and outcome.status is not JobStatus.LOST:
            self._durations_ms.append(job.duration_ms)
        self.finished_counts[job.status] += 1
        self.metrics.finished(job)
        fields = {"jobId": job.job_id, "status": job.status.value, "exitCode": job.exit_code, "signal": job.signal}
        log.info(
            "job %s %s: exit=%s signal=%s duration_ms=%s error=%s",
            job.job_id,
            job.status.value,
            job.exit_code,
            job.signal,
            job.duration_ms,
            job.error,
            extra=fields | {"durationMs": job.duration_ms, "error": job.error},
        )

    def _retry_after_s(self) -> int:
        mean_ms = sum(self._durations_ms) / len(self._durations_ms) if self._durations_ms else 1000
        return max(1, math.ceil(mean_ms / 1000))
