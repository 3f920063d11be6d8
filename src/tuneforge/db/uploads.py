"""Uploads (OpenAI's /v1/uploads) and their parts: a pending upload takes parts until they reach its
declared size, then completes into a file, or is cancelled, or expires.

Every change is one guarded UPDATE (status still pending, the size not passed), so concurrent parts, a
completion and a cancel on any number of API processes can never pass the declared size, complete twice,
or complete a cancelled upload. A part's bytes are a blob in the artifact store, kept while its upload is
pending (part_blob_pending, asked by the blob collector) and collected once it is not.
"""

from __future__ import annotations

from sqlalchemy import exists, func, select, update
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import new_id, now
from tuneforge.db.tables import Upload, UploadPart

UPLOAD, PART = "upload_", "part_"
PENDING, COMPLETED, CANCELLED, EXPIRED = "pending", "completed", "cancelled", "expired"


def create_upload(session: Session, *, tenant_id: str, filename: str, purpose: str, mime_type: str, size: int,
                  expires_in_s: float) -> Upload:
    created = now()
    row = Upload(id=new_id(UPLOAD), tenant_id=tenant_id, filename=filename, purpose=purpose, mime_type=mime_type,
                 bytes=size, received_bytes=0, status=PENDING, created_at=created,
                 expires_at=created + int(expires_in_s))
    session.add(row)
    session.flush()
    return row


def get_upload(session: Session, *, tenant_id: str, upload_id: str) -> Upload | None:
    """The tenant's upload; another tenant's id answers None, exactly like a missing one. A pending upload
    past its deadline is marked expired here (the sweep may not have come by yet)."""
    row = session.scalar(select(Upload).where(Upload.id == upload_id, Upload.tenant_id == tenant_id))
    if row is not None and row.status == PENDING and row.expires_at <= now():
        _set_status(session, row, EXPIRED, was=PENDING)
    return row


def _set_status(session: Session, row: Upload, status: str, *, was: str, **values) -> bool:
    changed = session.execute(
        update(Upload).where(Upload.id == row.id, Upload.status == was).values(status=status, **values)
        .execution_options(synchronize_session=False)
    ).rowcount == 1
    session.refresh(row)
    return changed


def add_part(session: Session, *, upload: Upload, size: int, sha256: str) -> UploadPart | None:
    """Record a part whose blob is in the store, if the upload is still pending and the part fits in what
    its declared size leaves (one guarded UPDATE); None otherwise (nothing recorded)."""
    grown = session.execute(
        update(Upload).where(Upload.id == upload.id, Upload.status == PENDING, Upload.expires_at > now(),
                             Upload.received_bytes + size <= Upload.bytes)
        .values(received_bytes=Upload.received_bytes + size).execution_options(synchronize_session=False)
    ).rowcount == 1
    if not grown:
        session.refresh(upload)
        return None
    part = UploadPart(id=new_id(PART), upload_id=upload.id, bytes=size, sha256=sha256, created_at=now())
    session.add(part)
    session.flush()
    return part


def parts_in_order(session: Session, *, upload_id: str, part_ids: list[str]) -> tuple[list[UploadPart], list[str]]:
    """The upload's parts named by part_ids, in that order, and the ids that are not parts of it."""
    found = {p.id: p for p in session.scalars(select(UploadPart).where(UploadPart.upload_id == upload_id,
                                                                        UploadPart.id.in_(set(part_ids))))}
    return [found[i] for i in part_ids if i in found], [i for i in part_ids if i not in found]


def count_parts(session: Session, *, upload_id: str) -> int:
    return int(session.scalar(select(func.count()).select_from(UploadPart).where(UploadPart.upload_id == upload_id)))


def complete(session: Session, *, upload: Upload, file_id: str) -> bool:
    """pending -> completed with the file it became; False when it was no longer pending."""
    return _set_status(session, upload, COMPLETED, was=PENDING, file_id=file_id)


def cancel(session: Session, *, upload: Upload) -> bool:
    """pending -> cancelled; False when it was no longer pending."""
    return _set_status(session, upload, CANCELLED, was=PENDING)


def expire_uploads(session: Session, *, now_s: int) -> int:
    """Mark every pending upload past its deadline expired (their parts' blobs are then collected)."""
    return session.execute(
        update(Upload).where(Upload.status == PENDING, Upload.expires_at <= now_s).values(status=EXPIRED)
        .execution_options(synchronize_session=False)
    ).rowcount


def part_blob_pending(session: Session, *, sha256: str) -> bool:
    """Whether a part of a pending upload has this blob (the collector must keep it)."""
    return bool(session.scalar(select(exists().where(
        UploadPart.sha256 == sha256, UploadPart.upload_id == Upload.id, Upload.status == PENDING))))
