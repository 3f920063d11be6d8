"""What a job reports: its events (the recipe's events.jsonl plus the control plane's own), the metrics
series, and the checkpoints. Workers ingest a job's log in the same transaction that moves its offset,
so an event is stored exactly once however often workers change.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import CHECKPOINT, EVENT, new_id, now
from tuneforge.db.pagination import keyset_page
from tuneforge.db.tables import Job, JobCheckpoint, JobEvent, JobMetric

# Per-step lists (which examples a step saw) belong in the job directory, not in the metrics series.
_NOT_METRICS = {"step", "total_steps", "example_ids", "kind"}


def add_event(
    session: Session, *, job_id: str, message: str, level: str = "info", type: str = "message",
    data: dict[str, Any] | None = None, event_id: str | None = None, created_at: int | None = None,
) -> JobEvent:
    event = JobEvent(
        id=event_id or new_id(EVENT), job_id=job_id, created_at=created_at or now(), level=_level(level), type=type,
        message=message, data=data,
    )
    session.add(event)
    return event


def ingest(
    session: Session, *, job_id: str, attempt: int, worker_id: str, events: list[dict[str, Any]], offset: int
) -> bool:
    """Store events read from events.jsonl and advance the job's offset to `offset`.

    Guarded by attempt and lease owner: a worker that lost the job stores nothing (returns False).
    """
    moved = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempt == attempt, Job.lease_owner == worker_id)
        .values(events_offset=offset)
    ).rowcount
    if not moved:
        return False
    known = set(session.scalars(select(JobEvent.id).where(JobEvent.id.in_([e.get("id") for e in events if e.get("id")]))))
    for raw in events:
        if raw.get("id") in known:
            continue
        data = raw.get("data") or {}
        add_event(
            session, job_id=job_id, event_id=raw.get("id"), created_at=raw.get("created_at"), level=raw.get("level", "info"),
            type=raw.get("type", "message"), message=str(raw.get("message", "")), data=data,
        )
        if raw.get("type") == "metrics" and isinstance(data.get("step"), int):
            values = {k: v for k, v in data.items() if k not in _NOT_METRICS and isinstance(v, (int, float, type(None)))}
            session.add(JobMetric(job_id=job_id, step=data["step"], created_at=raw.get("created_at") or now(), values=values))
        if data.get("kind") == "checkpoint" and isinstance(data.get("step"), int):
            record_checkpoint(session, job_id=job_id, step=data["step"], path=str(data.get("path", "")),
                              size=data.get("bytes"), metrics=data.get("metrics") or {}, created_at=raw.get("created_at"))
    return True


def record_checkpoint(
    session: Session, *, job_id: str, step: int, path: str, size: int | None, metrics: dict[str, Any], created_at: int | None
) -> None:
    """One checkpoint per step: a resumed attempt that saves the same step again replaces the old record."""
    session.execute(delete(JobCheckpoint).where(JobCheckpoint.job_id == job_id, JobCheckpoint.step == step))
    session.add(JobCheckpoint(
        id=new_id(CHECKPOINT), job_id=job_id, step=step, path=path, bytes=size, metrics=metrics,
        created_at=created_at or now(),
    ))


def list_events(session: Session, *, job_id: str, limit: int, after: str | None = None) -> tuple[list[JobEvent], bool]:
    """Newest first, as the OpenAI API lists them; `after` is the last id of the previous page."""
    return keyset_page(session, select(JobEvent).where(JobEvent.job_id == job_id), key=JobEvent.seq,
                       id_column=JobEvent.id, after=after, limit=limit, scope=JobEvent.job_id == job_id)


def events_since(session: Session, *, job_id: str, after_seq: int, limit: int = 500) -> list[JobEvent]:
    """Oldest first, for a live stream that resumes where it left off."""
    query = select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.seq > after_seq)
    return list(session.scalars(query.order_by(JobEvent.seq).limit(limit)))


def event_seq(session: Session, *, job_id: str, event_id: str) -> int | None:
    return session.scalar(select(JobEvent.seq).where(JobEvent.id == event_id, JobEvent.job_id == job_id))


def list_metrics(session: Session, *, job_id: str, after_step: int | None = None, limit: int = 10_000) -> list[JobMetric]:
    query = select(JobMetric).where(JobMetric.job_id == job_id)
    if after_step is not None:
        query = query.where(JobMetric.step > after_step)
    return list(session.scalars(query.order_by(JobMetric.step, JobMetric.seq).limit(limit)))


def list_checkpoints(
    session: Session, *, job_id: str, limit: int, after: str | None = None
) -> tuple[list[JobCheckpoint], bool]:
    return keyset_page(session, select(JobCheckpoint).where(JobCheckpoint.job_id == job_id), key=JobCheckpoint.step,
                       id_column=JobCheckpoint.id, after=after, limit=limit, scope=JobCheckpoint.job_id == job_id)


def _level(level: str) -> str:
    # The recipe writes Python's "warning"; the OpenAI event shape says "warn".
    return {"warning": "warn", "debug": "info", "critical": "error"}.get(level, level if level in ("info", "warn", "error") else "info")


def job_heads(session: Session, *, job_ids: list[str]) -> dict[str, tuple[int, str]]:
    """Each job's newest event seq (0 if none) and its status, for many jobs in one query."""
    newest = (select(func.max(JobEvent.seq)).where(JobEvent.job_id == Job.id)
              .correlate(Job).scalar_subquery())  # a per-job index lookup, not a scan of all events
    rows = session.execute(select(Job.id, Job.status, newest).where(Job.id.in_(job_ids)))
    return {job_id: (seq or 0, status) for job_id, status, seq in rows}
