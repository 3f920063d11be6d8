"""Prometheus `/metrics`: the platform's gauges, read from the database at scrape time, and the API's
request latency histogram.

Every API process answers the same gauges (a custom collector queries the database on each scrape, so
no process holds state another lacks). The latency histogram is per process: with several API processes
set PROMETHEUS_MULTIPROC_DIR (prometheus-client's multiprocess mode: each process writes its samples to
files there and a scrape of any one sums them all); without it a scrape shows the process it reached.
Labels never name a user or tenant; running jobs are labelled by job id (bounded by the GPUs, and the
series end when the job does). The endpoint needs an admin key (Prometheus: `authorization`).
"""

from __future__ import annotations

import os
import time

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from sqlalchemy.exc import SQLAlchemyError

from tuneforge.api.dependencies import AdminCaller, Db
from tuneforge.db import monitoring as monitoring_rows
from tuneforge.db.session import Database
from tuneforge.scheduler.admission import WORKER_SEEN_WITHIN_S

router = APIRouter()
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

REQUEST_LATENCY = Histogram(
    "tuneforge_http_request_duration_seconds", "API request latency, by route template, method and status code.",
    ["method", "route", "status"], registry=None,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


class RequestMetrics:
    """ASGI middleware timing every HTTP request by its route template (never the raw path: ids would make
    a series per object; unknown paths are "unmatched", unknown methods "other"). Event streams are timed to their end, so /events/stream sits in the top buckets."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in METHODS else "other"  # a client may send any token
            REQUEST_LATENCY.labels(method, template, str(status["code"])).observe(time.perf_counter() - started)


class DatabaseCollector:
    """The gauges of db/monitoring.py's snapshot, queried when Prometheus scrapes."""

    def __init__(self, db: Database):
        self.db = db

    def collect(self):
        up = GaugeMetricFamily("tuneforge_database_up", "1 when this scrape could read the database.")
        try:
            with self.db.session() as session:
                snap = monitoring_rows.snapshot(session, seen_within_s=WORKER_SEEN_WITHIN_S)
        except SQLAlchemyError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _families(snap)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _families(snap: monitoring_rows.Snapshot):
    jobs = GaugeMetricFamily("tuneforge_jobs", "Jobs by status.", labels=["status"])
    for status, count in sorted(snap.jobs_by_status.items()):
        jobs.add_metric([status], count)
    yield jobs
    yield _gauge("tuneforge_queue_length", "Jobs waiting in the queue.", snap.queued)
    yield _gauge("tuneforge_queue_oldest_wait_seconds", "How long the oldest queued job has existed.",
                 snap.oldest_queued_wait_s)
    yield _gauge("tuneforge_gpu_slots", "GPU (or CPU) slots of the live workers' nodes.", snap.gpu_slots)
    yield _gauge("tuneforge_gpu_slots_used", "Slots held by running jobs.", sum(job.gpus for job in snap.running))
    speed = GaugeMetricFamily("tuneforge_job_tokens_per_second", "A running job's last reported training "
                              "throughput.", labels=["job_id"])
    mfu = GaugeMetricFamily("tuneforge_job_mfu_ratio", "A running job's last model-FLOPs utilization estimate.",
                            labels=["job_id"])
    firing = GaugeMetricFamily("tuneforge_job_alert_firing", "1 for each alert firing on a running job.",
                               labels=["job_id", "alert"])
    per_alert: dict[str, int] = {}
    for job in snap.running:
        if job.tokens_per_second is not None:
            speed.add_metric([job.job_id], job.tokens_per_second)
        if job.mfu is not None:
            mfu.add_metric([job.job_id], job.mfu)
        for alert in sorted(job.firing):
            firing.add_metric([job.job_id, alert], 1)
            per_alert[alert] = per_alert.get(alert, 0) + 1
    yield speed
    yield mfu
    yield firing
    alerts = GaugeMetricFamily("tuneforge_alerts_firing", "Running jobs with each alert firing.", labels=["alert"])
    for alert, count in sorted(per_alert.items()):
        alerts.add_metric([alert], count)
    yield alerts
    yield _gauge("tuneforge_workers", "Workers that sent a heartbeat recently.", len(snap.workers))
    age = GaugeMetricFamily("tuneforge_worker_heartbeat_age_seconds", "Seconds since each live worker's last "
                            "heartbeat.", labels=["worker"])
    for worker, seconds in sorted(snap.workers.items()):
        age.add_metric([worker], seconds)
    yield age


def exposition(db: Database) -> bytes:
    """The text exposition of one scrape: the database gauges and the latency histogram(s)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(db))
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)  # every API process's histogram samples, summed
    else:
        registry.register(REQUEST_LATENCY)
    return generate_latest(registry)


@router.get("/metrics", include_in_schema=False)
def metrics(caller: AdminCaller, db: Db) -> Response:
    return Response(exposition(db), media_type=CONTENT_TYPE_LATEST)
