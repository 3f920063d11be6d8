"""The audit log: one append-only row per mutating API call -- who (key id), tenant, action, object,
outcome (HTTP status), request id, source address, time. Rows are only ever inserted here; the
database refuses UPDATE and DELETE on the table (triggers from migration 0005).

Nothing else goes in: no secret, no request or response body.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import new_id
from tuneforge.db.pagination import keyset_page
from tuneforge.db.tables import AuditRecord

AUDIT = "audit_"


def record(
    session: Session, *, tenant_id: str | None, key_id: str | None, action: str, object_id: str | None, status: int,
    request_id: str, source: str | None, at: float | None = None,
) -> AuditRecord:
    row = AuditRecord(id=new_id(AUDIT), created_at=time.time() if at is None else at, tenant_id=tenant_id,
                      key_id=key_id, action=action[:160], object_id=object_id[:255] if object_id else None,
                      status=status, request_id=request_id[:64], source=source[:64] if source else None)
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True)
class AuditFilter:
    """Which records to show; every field optional. `since` / `until` are Unix seconds (inclusive)."""

    tenant_id: str | None = None
    key_id: str | None = None
    action: str | None = None  # a prefix: "DELETE", "POST /v1/files"
    object_id: str | None = None
    status: int | None = None
    since: float | None = None
    until: float | None = None

    def query(self) -> Select:
        query = select(AuditRecord)
        for column, value in ((AuditRecord.tenant_id, self.tenant_id), (AuditRecord.key_id, self.key_id),
                              (AuditRecord.object_id, self.object_id), (AuditRecord.status, self.status)):
            if value is not None:
                query = query.where(column == value)
        if self.action:
            query = query.where(AuditRecord.action.startswith(self.action, autoescape=True))
        if self.since is not None:
            query = query.where(AuditRecord.created_at >= self.since)
        if self.until is not None:
            query = query.where(AuditRecord.created_at <= self.until)
        return query


def list_records(session: Session, *, where: AuditFilter, limit: int, after: str | None = None) -> tuple[list[AuditRecord], bool]:
    """Newest first; `after` is the last id of the previous page."""
    return keyset_page(session, where.query(), key=AuditRecord.seq, id_column=AuditRecord.id, after=after, limit=limit)


def iter_records(session: Session, *, where: AuditFilter, batch: int = 1000) -> Iterator[AuditRecord]:
    """Every matching record, oldest first, read in keyset batches (an export of any size in bounded memory)."""
    last = 0
    while True:
        rows = list(session.scalars(where.query().where(AuditRecord.seq > last).order_by(AuditRecord.seq).limit(batch)))
        yield from rows
        if len(rows) < batch:
            return
        last = rows[-1].seq
