"""Data access for the object store's collector: links whose owner is gone for good, and objects that
nothing links to any more (scheduler/blobs.py removes their bytes)."""

from __future__ import annotations

from sqlalchemy import delete, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from tuneforge.db.tables import FineTunedModel, File, Job, ObjectLink, RegisteredBaseModel, StoredObject

BASE_MODEL_OWNER = "base:"  # registry/storage/jobs.py base_model_owner: "base:" and the manifest digest's first 59


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


def dead_base_model_owners(session: Session, *, tenant_id: str, cutoff: int, limit: int = 500) -> list[str]:
    """Owners of registered base models' files (of the store-only owner tenant_id) whose digest no registered base
    model has any more (it was deleted), and that nobody linked since cutoff: a registration publishes the files
    before its row exists, so a young owner may be one that is registering right now."""
    digest = func.substr(ObjectLink.owner, len(BASE_MODEL_OWNER) + 1)
    registered = exists().where(func.substr(RegisteredBaseModel.manifest_sha256, 1, func.length(digest)) == digest)
    query = (select(ObjectLink.owner).where(ObjectLink.tenant_id == tenant_id,
                                            ObjectLink.owner.startswith(BASE_MODEL_OWNER, autoescape=True), ~registered)
             .group_by(ObjectLink.owner).having(func.max(ObjectLink.created_at) < cutoff)
             .order_by(ObjectLink.owner).limit(limit))
    return list(session.scalars(query))


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
