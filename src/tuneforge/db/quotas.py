"""What a tenant uses against its quotas (active jobs, stored bytes), and the per-key request token
bucket that every API process shares through the database.

The bucket is one row per key, refilled and spent by a single INSERT ... ON CONFLICT DO UPDATE ...
RETURNING (SQLite and PostgreSQL both have it), so concurrent requests on any number of processes can
never spend the same token twice and no read-modify-write race exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sqlalchemy import case, func, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from tuneforge.db.tables import File, Job, RateLimitBucket
from tuneforge.spec.api import ACTIVE_STATUSES


@dataclass(frozen=True)
class Spend:
    allowed: bool
    retry_after: float  # seconds until a token is there again (0 when allowed)


def _larger(a, b):
    return case((a > b, a), else_=b)


def _smaller(a, b):
    return case((a < b, a), else_=b)


def take_token(session: Session, *, key_id: str, now_s: float, per_second: float, capacity: float) -> Spend:
    """Spend one token of the key's bucket (capacity tokens, refilled at per_second), in one statement.

    Every request subtracts one token, and a request is allowed when that leaves the bucket at 0 or
    more. A refused request leaves the bucket below zero by exactly the token it did not get, which
    the next refill adds back, so refusals cost a client nothing and the count stays exact."""
    bucket = RateLimitBucket.__table__
    elapsed = _larger(literal(now_s) - bucket.c.updated_at, literal(0.0))
    held = case((bucket.c.tokens < 0, bucket.c.tokens + 1), else_=bucket.c.tokens)
    refilled = _smaller(held + elapsed * per_second, literal(float(capacity)))
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(bucket).values(key_id=key_id, tokens=float(capacity) - 1, updated_at=now_s)
        .on_conflict_do_update(index_elements=[bucket.c.key_id],
                               set_={"tokens": refilled - 1, "updated_at": _larger(bucket.c.updated_at, literal(now_s))})
        .returning(bucket.c.tokens)
    )
    tokens = session.execute(statement).scalar_one()
    if tokens >= 0:
        return Spend(True, 0.0)
    return Spend(False, -tokens / per_second if per_second > 0 else math.inf)


def peek_token(session: Session, *, key_id: str, now_s: float, per_second: float, capacity: float) -> Spend:
    """Whether take_token would allow a request now, without spending (nothing is written)."""
    row = session.get(RateLimitBucket, key_id)
    if row is None:
        return Spend(True, 0.0)
    held = row.tokens + 1 if row.tokens < 0 else row.tokens
    tokens = min(float(capacity), held + max(0.0, now_s - row.updated_at) * per_second) - 1
    if tokens >= 0:
        return Spend(True, 0.0)
    return Spend(False, -tokens / per_second if per_second > 0 else math.inf)


def stored_bytes(session: Session, *, tenant_id: str) -> int:
    """Bytes of the tenant's live files, each upload counted (two uploads of the same bytes count twice:
    a tenant's usage never depends on what other tenants hold)."""
    return int(session.scalar(select(func.coalesce(func.sum(File.bytes), 0))
                              .where(File.tenant_id == tenant_id, File.deleted_at.is_(None))) or 0)


def active_jobs(session: Session, *, tenant_id: str) -> int:
    """The tenant's jobs that are not finished: validating files, queued, running or paused."""
    return int(session.scalar(select(func.count()).select_from(Job)
                              .where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES))) or 0)
