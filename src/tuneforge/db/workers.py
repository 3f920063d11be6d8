"""Workers and their GPU inventory, so job creation can refuse what no worker could ever run."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import now
from tuneforge.db.tables import Worker


def register_worker(session: Session, *, worker_id: str, hostname: str, executor: str, inventory: list[dict[str, Any]]) -> None:
    row = session.get(Worker, worker_id)
    if row is None:
        row = Worker(id=worker_id, hostname=hostname, executor=executor, inventory=inventory, started_at=now(), last_seen=time.time())
        session.add(row)
    row.inventory, row.last_seen, row.stopped_at = inventory, time.time(), None


def stop_worker(session: Session, *, worker_id: str) -> None:
    row = session.get(Worker, worker_id)
    if row is not None:
        row.stopped_at = now()


def live_workers(session: Session, *, seen_within_s: float) -> list[Worker]:
    query = select(Worker).where(Worker.stopped_at.is_(None), Worker.last_seen >= time.time() - seen_within_s)
    return list(session.scalars(query.order_by(Worker.id)))
