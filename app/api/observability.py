"""Prometheus metrics: HTTP requests by route and status, request latency, and job figures read from the
database at scrape time (so they are right whichever worker ran the job)."""

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.statuses import TERMINAL, JobStatus
from app.core.tables import Job

# Label values come from this fixed set, never from the request itself: a client can send any method token, and
# each new value would be a new time series (unbounded memory). Routes are templates ("/v1/models/{model_id}"),
# so no id, tenant or key ever becomes a label.
HTTP_METHODS = frozenset({"DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"})

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)
WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)


class JobCollector:
    """Jobs by status, job duration and queue wait, from the jobs table."""

    def __init__(self, factory: sessionmaker[Session]):
        self.factory = factory

    def describe(self):
        return []

    def collect(self):
        with self.factory() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            timings = session.execute(
                select(Job.created_at, Job.started_at, Job.finished_at)
                .where(Job.status.in_(TERMINAL), Job.started_at.is_not(None)).order_by(Job.id.desc()).limit(10000)
            ).all()
        jobs = GaugeMetricFamily("modelpress_jobs", "Jobs by status", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status.value, 0))
        yield jobs
        yield _histogram("modelpress_job_duration_seconds", "Run time of finished jobs (last 10000)",
                         [(f - s).total_seconds() for c, s, f in timings if f], DURATION_BUCKETS)
        yield _histogram("modelpress_job_queue_wait_seconds", "Time from submission to start (last 10000)",
                         [(s - c).total_seconds() for c, s, f in timings], WAIT_BUCKETS)


def _histogram(name: str, doc: str, values: list[float], buckets: tuple) -> HistogramMetricFamily:
    cumulative = [(str(b), sum(1 for v in values if v <= b)) for b in buckets]
    cumulative.append(("+Inf", len(values)))
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], cumulative, sum_value=sum(values))
    return family


class Metrics:
    def __init__(self, factory: sessionmaker[Session]):
        self.registry = CollectorRegistry()
        self.requests = Counter("modelpress_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("modelpress_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], registry=self.registry)
        self.registry.register(JobCollector(factory))


class MetricsMiddleware:
    """Counts every request by its route template (not the raw path, which would explode cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"
            self.metrics.requests.labels(method, template, str(status)).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
