"""Uploaded files: metadata rows over content-addressed blobs in the artifact store.

A file is "uploaded" until a scheduler has validated it (claimed with validation_owner until
validation_expires_at, so two schedulers never validate one file and a dead one's claim runs out),
then "processed" or "error" with its dataset report.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import FILE, new_id, now
from tuneforge.db.pagination import keyset_page
from tuneforge.db.tables import File, Job

UPLOADED, PROCESSED, ERROR = "uploaded", "processed", "error"


def create_file(
    session: Session, *, tenant_id: str, filename: str, purpose: str, size: int, sha256: str, report: dict[str, Any],
    status: str, status_details: str | None,
) -> File:
    row = File(
        id=new_id(FILE), tenant_id=tenant_id, filename=filename, purpose=purpose, bytes=size, sha256=sha256,
        created_at=now(), status=status, status_details=status_details, report=report,
    )
    session.add(row)
    session.flush()
    return row


def get_file(session: Session, *, tenant_id: str, file_id: str) -> File | None:
    """The tenant's live file; another tenant's id answers None, exactly like a missing one."""
    return session.scalar(
        select(File).where(File.id == file_id, File.tenant_id == tenant_id, File.deleted_at.is_(None))
    )


def list_files(
    session: Session, *, tenant_id: str, limit: int, after: str | None = None, order: str = "desc", purpose: str | None = None
) -> tuple[list[File], bool]:
    query = select(File).where(File.tenant_id == tenant_id, File.deleted_at.is_(None))
    if purpose:
        query = query.where(File.purpose == purpose)
    return keyset_page(session, query, key=File.seq, id_column=File.id, after=after, limit=limit,
                       scope=File.tenant_id == tenant_id, descending=order == "desc")


def delete_file(session: Session, *, file: File) -> None:
    """Mark the file deleted. Its blob stays until nothing refers to it (the scheduler's collector)."""
    file.deleted_at = now()
    session.flush()


def blob_referenced(session: Session, *, sha256: str, deleted_after: int, active_statuses: tuple[str, ...]) -> bool:
    """Whether the blob must stay: a live file row has it, one deleted after deleted_after (a job being
    created on it may not have committed yet), or a job that may still run was created on a file row,
    deleted or not, that has it."""
    rows = select(File.id).where(File.sha256 == sha256,
                                 or_(File.deleted_at.is_(None), File.deleted_at >= deleted_after)).limit(1)
    if session.scalar(rows) is not None:
        return True
    with_blob = select(File.id).where(File.sha256 == sha256)
    jobs = select(Job.id).where(Job.status.in_(active_statuses),
                                or_(Job.training_file.in_(with_blob), Job.validation_file.in_(with_blob))).limit(1)
    return session.scalar(jobs) is not None


def _claimable(now_s: float):
    return (File.status == UPLOADED, File.deleted_at.is_(None),
            or_(File.validation_owner.is_(None), File.validation_expires_at < now_s))


def claim_upload(session: Session, *, owner: str, until: float, now_s: float) -> File | None:
    """Claim the oldest live file still waiting for validation (one guarded UPDATE, so a file is never
    claimed twice); None when there is none."""
    for file_id in session.scalars(select(File.id).where(*_claimable(now_s)).order_by(File.seq).limit(8)):
        claimed = session.execute(
            update(File).where(File.id == file_id, *_claimable(now_s))
            .values(validation_owner=owner, validation_expires_at=until).execution_options(synchronize_session=False)
        ).rowcount == 1
        if claimed:
            return session.scalar(select(File).where(File.id == file_id).execution_options(populate_existing=True))
    return None


def finish_validation(session: Session, *, file_id: str, owner: str, status: str, report: dict[str, Any],
                      status_details: str | None) -> bool:
    """uploaded -> processed or error with its report, if this owner still holds the claim."""
    return session.execute(
        update(File).where(File.id == file_id, File.validation_owner == owner, File.status == UPLOADED)
        .values(status=status, report=report, status_details=status_details, validation_owner=None,
                validation_expires_at=None).execution_options(synchronize_session=False)
    ).rowcount == 1


def release_validation(session: Session, *, file_id: str, owner: str) -> bool:
    """Give a claim back (the file stays uploaded, to be validated again)."""
    return session.execute(
        update(File).where(File.id == file_id, File.validation_owner == owner)
        .values(validation_owner=None, validation_expires_at=None).execution_options(synchronize_session=False)
    ).rowcount == 1


def jobs_waiting_on(session: Session, *, file_id: str, status: str) -> list[Job]:
    """Jobs in `status` (validating_files) created on this file, as training or validation file."""
    return list(session.scalars(
        select(Job).where(Job.status == status, or_(Job.training_file == file_id, Job.validation_file == file_id))
        .order_by(Job.seq)
    ))


def files_by_id(session: Session, *, file_ids: list[str]) -> dict[str, File]:
    """Files by id regardless of tenant or deletion: for workers materializing a job's data."""
    return {row.id: row for row in session.scalars(select(File).where(File.id.in_(file_ids)))}
