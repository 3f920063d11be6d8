"""What a Prometheus scrape reads from the database: jobs by status, the queue, GPU slots, the running
jobs' latest throughput and firing alerts, and worker heartbeats. Every API process answers the same,
since all of it lives in the database (api/metrics.py turns it into metric families).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tuneforge.db.tables import Job, JobEvent, JobMetric, Worker
from tuneforge.spec.api import QUEUED, RUNNING
from tuneforge.spec.monitoring import ALERT_KIND

RECENT_METRIC_ROWS = 20  # a running job's newest metric rows searched for its throughput (eval rows have none)


@dataclass
class RunningJob:
    job_id: str
    gpus: int
    since: float  # when this attempt started: an earlier attempt's alerts are not this one's
    tokens_per_second: float | None = None
    mfu: float | None = None
    firing: set[str] = field(default_factory=set)  # the alerts firing now


@dataclass
class Snapshot:
    jobs_by_status: dict[str, int]
    queued: int
    oldest_queued_wait_s: float
    running: list[RunningJob]
    gpu_slots: int  # of the live workers' nodes
    workers: dict[str, float]  # live worker id -> seconds since its last heartbeat


def snapshot(session: Session, *, seen_within_s: float, now_s: float | None = None) -> Snapshot:
    now_s = time.time() if now_s is None else now_s
    by_status = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    oldest = session.scalar(select(func.min(Job.created_at)).where(Job.status == QUEUED))
    running = [RunningJob(job_id, gpus * nodes, since or 0.0) for job_id, gpus, nodes, since in session.execute(
        select(Job.id, Job.num_gpus, Job.num_nodes, Job.attempt_started_at).where(Job.status == RUNNING).order_by(Job.seq))]
    for job in running:
        _latest_throughput(session, job)
    _firing_alerts(session, {job.job_id: job for job in running})
    live = session.scalars(select(Worker).where(Worker.stopped_at.is_(None), Worker.last_seen >= now_s - seen_within_s))
    workers, slots = {}, 0
    for worker in live:
        workers[worker.id] = max(0.0, now_s - worker.last_seen)
        slots += sum(int(node.get("gpus", 0)) for node in worker.inventory or [])
    return Snapshot(by_status, by_status.get(QUEUED, 0), max(0.0, now_s - oldest) if oldest else 0.0, running,
                    slots, workers)


def _latest_throughput(session: Session, job: RunningJob) -> None:
    rows = session.scalars(select(JobMetric.values).where(JobMetric.job_id == job.job_id)
                           .order_by(JobMetric.step.desc(), JobMetric.seq.desc()).limit(RECENT_METRIC_ROWS))
    for values in rows:
        if isinstance(values.get("tokens_per_second"), (int, float)):
            job.tokens_per_second = float(values["tokens_per_second"])
            mfu = values.get("mfu")
            job.mfu = float(mfu) if isinstance(mfu, (int, float)) else None
            return


def _firing_alerts(session: Session, jobs: dict[str, RunningJob]) -> None:
    """Replay the running jobs' alert events (oldest first): the last state of each alert wins."""
    if not jobs:
        return
    # Alert events' messages start with "alert " (engine/alerts.py, scheduler/stalls.py): the index on job_id
    # narrows to the running jobs, the prefix to their alerts.
    rows = session.execute(select(JobEvent.job_id, JobEvent.created_at, JobEvent.data)
                           .where(JobEvent.job_id.in_(list(jobs)), JobEvent.message.like("alert %"))
                           .order_by(JobEvent.seq))
    for job_id, created_at, data in rows:
        if not isinstance(data, dict) or data.get("kind") != ALERT_KIND or not data.get("alert"):
            continue
        if created_at < int(jobs[job_id].since):  # event times are whole seconds
            continue
        if data.get("state") == "firing":
            jobs[job_id].firing.add(data["alert"])
        else:
            jobs[job_id].firing.discard(data["alert"])
