"""Uploaded files: metadata rows over content-addressed blobs in the artifact store."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import FILE, new_id, now
from tuneforge.db.pagination import keyset_page
from tuneforge.db.tables import File, Job


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


def delete_file(session: Session, *, file: File) -> bool:
    """Mark the file deleted; True when no other live file shares its blob (the caller may remove it)."""
    file.deleted_at = now()
    session.flush()
    others = session.scalar(
        select(File.id).where(File.sha256 == file.sha256, File.deleted_at.is_(None)).limit(1)
    )
    return others is None


def file_in_use(session: Session, *, file_id: str, active_statuses: tuple[str, ...]) -> bool:
    """Whether a job that may still read this file exists."""
    query = select(Job.id).where(
        (Job.training_file == file_id) | (Job.validation_file == file_id), Job.status.in_(active_statuses)
    )
    return session.scalar(query.limit(1)) is not None


def files_by_id(session: Session, *, file_ids: list[str]) -> dict[str, File]:
    """Files by id regardless of tenant or deletion: for workers materializing a job's data."""
    return {row.id: row for row in session.scalars(select(File).where(File.id.in_(file_ids)))}
