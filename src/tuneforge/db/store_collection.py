"""Data access for the object store's collector: links whose owner is gone for good, and objects that
nothing links to any more (scheduler/blobs.py removes their bytes)."""

from __future__ import annotations

from sqlalchemy import delete, exists, or_, select
from sqlalchemy.orm import Session, aliased

from tuneforge.db.tables import FineTunedModel, File, Job, ObjectLink, StoredObject


def dead_link_owners(session: Session, *, cutoff: int, active_statuses: tuple[str, ...], limit: int = 500) -> list[str]:
    """Owners whose links can go: a file deleted before cutoff that no job which may still run names, or a
    job whose fine-tuned model was deleted before cutoff (and that has no live one)."""
    job_on_file = exists().where(Job.status.in_(active_statuses),
                                 or_(Job.training_file == File.id, Job.validation_file == File.id))
    files = select(ObjectLink.owner).join(File, File.id == ObjectLink.owner).where(
        File.deleted_at.is_not(None), File.deleted_at < cutoff, ~job_on_file)
    other = aliased(FineTunedModel)
    live_model = exists().where(other.job_id == ObjectLink.owner, or_(other.deleted_at.is_(None),
                                                                      other.deleted_at >= cutoff))
    jobs = select(ObjectLink.owner).join(FineTunedModel, FineTunedModel.job_id == ObjectLink.owner).where(~live_model)
    return sorted(set(session.scalars(files.distinct().limit(limit))) | set(session.scalars(jobs.distinct().limit(limit))))


def drop_links(session: Session, *, owner: str) -> int:
    return session.execute(delete(ObjectLink).where(ObjectLink.owner == owner)
                           .execution_options(synchronize_session=False)).rowcount


def unlinked_objects(session: Session, *, cutoff: int, limit: int = 500) -> list[StoredObject]:
    """Objects created before cutoff that no link names."""
    return list(session.scalars(select(StoredObject).where(
        StoredObject.created_at < cutoff, ~exists().where(ObjectLink.object_id == StoredObject.id))
        .order_by(StoredObject.seq).limit(limit)))


def drop_unlinked_object(session: Session, *, object_id: str) -> bool:
    """Forget an object if, at this moment, nothing links to it (one guarded DELETE: a writer linking it
    concurrently either is seen, or its link's foreign key makes this statement fail)."""
    return session.execute(delete(StoredObject).where(
        StoredObject.id == object_id, ~exists().where(ObjectLink.object_id == object_id))
        .execution_options(synchronize_session=False)).rowcount == 1
