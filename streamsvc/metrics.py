"""Prometheus metrics, through the official client: counters and histograms fed by the pool,
gauges and stream totals read from the pool and the session registry at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .models import Job, JobStatus

if TYPE_CHECKING:
    from .pool import WorkerPool
    from .registry import SessionRegistry

#: text exposition format 0.0.4, which every Prometheus version scrapes
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: seconds, from a `true` to a build that takes its whole default timeout
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300)


class Metrics:
    """One registry per app, so that several apps in one process (tests) never mix."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs_submitted = Counter(
            "streamsvc_jobs_submitted", "Jobs accepted by POST /api/execute", registry=self.registry
        )
        self.jobs_finished = Counter(
            "streamsvc_jobs_finished", "Jobs that ended, by final status", ["status"], registry=self.registry
        )
        for status in JobStatus:
            if status.finished:
                self.jobs_finished.labels(status.value)
        self.job_duration = Histogram(
            "streamsvc_job_duration_seconds",
            "Run time of finished jobs, start to end",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "streamsvc_job_queue_wait_seconds",
            "Time from acceptance to start",
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )

    def submitted(self) -> None:
        self.jobs_submitted.inc()

    def started(self, job: Job) -> None:
        if job.started_at is not None:
            self.queue_wait.observe(max(0.0, job.started_at - job.created_at))

    def finished(self, job: Job) -> None:
        self.jobs_finished.labels(job.status.value).inc()
        if job.duration_ms is not None:
            self.job_duration.observe(job.duration_ms / 1000)

    def watch(self, pool: WorkerPool, sessions: SessionRegistry) -> None:
        """Read the queue and the open streams at each scrape."""
        self.registry.register(_LiveCollector(pool, sessions))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    def __init__(self, pool: WorkerPool, sessions: SessionRegistry) -> None:
        self.pool = pool
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        status = self.pool.status()
        yield GaugeMetricFamily("streamsvc_queue_depth", "Jobs accepted and waiting for a worker", status["pending"])
        yield GaugeMetricFamily("streamsvc_jobs_running", "Jobs running now", status["running"])
        yield GaugeMetricFamily("streamsvc_workers", "Jobs that may run at once", status["concurrency"])
        yield GaugeMetricFamily("streamsvc_streams_open", "Open SSE streams", self.sessions.count())
        events, sent_bytes = self.sessions.sent()
        yield CounterMetricFamily("streamsvc_stream_events_sent", "SSE events written to subscribers", events)
        yield CounterMetricFamily("streamsvc_stream_bytes_sent", "SSE bytes written to subscribers", sent_bytes)
