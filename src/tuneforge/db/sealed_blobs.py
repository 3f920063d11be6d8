"""Data access for the sealed artifact folder: one row per tenant and content with its wrapped data key,
and the references that keep a blob (sealed, or a plaintext one of an install from before sealing): a tenant's
files and upload parts, and the model registry's files (a version's, an export's: registry_blobs rows whose
owner is the tenant's); the holders buried when a blob's key was shredded (shredded_holders: who had the bytes
then, so the same bytes sealed again never open for them); and the wrapped data key of each job directory sealed
at rest (registry/storage/job_files.py)."""

from __future__ import annotations

from sqlalchemy import and_, delete, exists, or_, select, update
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import now
from tuneforge.db.tables import (File, Job, ModelExport, ModelVersion, RegistryBlob, SealedBlob, SealedJobKey,
                                 ShreddedHolder, Sweep, Upload, UploadPart)
from tuneforge.db.uploads import PENDING as PENDING_UPLOAD
from tuneforge.spec.api import ACTIVE_STATUSES, RUNNING

BLOB = "blob_"


def find_blob(session: Session, *, tenant_id: str, sha256: str) -> SealedBlob | None:
    return session.scalar(select(SealedBlob).where(SealedBlob.tenant_id == tenant_id, SealedBlob.sha256 == sha256))


def add_blob(session: Session, *, blob_id: str, tenant_id: str, sha256: str, size: int, key_version: int,
             wrapped_key: str) -> SealedBlob:
    at = now()
    row = SealedBlob(id=blob_id, tenant_id=tenant_id, sha256=sha256, bytes=size, key_version=key_version,
                     wrapped_key=wrapped_key, created_at=at, touched_at=at)
    session.add(row)
    session.flush()
    return row


def touch_blob(session: Session, *, blob_id: str) -> bool:
    """Mark the blob committed now (a second upload of the same bytes); False when it is gone already (a
    collector removed it first: the caller stores its own copy)."""
    return session.execute(update(SealedBlob).where(SealedBlob.id == blob_id).values(touched_at=now())
                           .execution_options(synchronize_session=False)).rowcount == 1


def drop_blob(session: Session, *, blob_id: str) -> None:
    # "evaluate": the dropped row leaves this session too (SQLite may hand its seq to the row that replaces it).
    session.execute(delete(SealedBlob).where(SealedBlob.id == blob_id)
                    .execution_options(synchronize_session="evaluate"))


def drop_if_untouched(session: Session, *, blob_id: str, cutoff: int) -> bool:
    """Forget the blob unless somebody committed it at or after cutoff; True when forgotten. One guarded
    DELETE: a concurrent commit either touched it first (kept) or finds it gone (stores its own copy).
    The holders buried for these bytes go with it: the collector drops a blob only once no holder of them
    can read it any more (sealed_blob_referenced counts buried holders too), so none is left to keep out."""
    found = session.execute(select(SealedBlob.tenant_id, SealedBlob.sha256).where(SealedBlob.id == blob_id)).first()
    dropped = session.execute(delete(SealedBlob).where(SealedBlob.id == blob_id, SealedBlob.touched_at < cutoff)
                              .execution_options(synchronize_session=False)).rowcount == 1
    if dropped and found is not None:
        session.execute(delete(ShreddedHolder).where(ShreddedHolder.tenant_id == found.tenant_id,
                                                     ShreddedHolder.sha256 == found.sha256)
                        .execution_options(synchronize_session=False))
    return dropped


def blobs_untouched_since(session: Session, *, cutoff: int, after_seq: int = 0, limit: int = 500) -> list[SealedBlob]:
    return list(session.scalars(select(SealedBlob).where(SealedBlob.touched_at < cutoff, SealedBlob.seq > after_seq)
                                .order_by(SealedBlob.seq).limit(limit)))


def known_blob_ids(session: Session, *, blob_ids: list[str]) -> set[str]:
    return set(session.scalars(select(SealedBlob.id).where(SealedBlob.id.in_(blob_ids)))) if blob_ids else set()


def blobs_wrapped_under_older(session: Session, *, tenant_id: str, version: int, among: list[int] | None = None,
                              limit: int = 500) -> list[SealedBlob]:
    """As db/keys.py objects_wrapped_under_older, for sealed blobs."""
    scope = [SealedBlob.tenant_id == tenant_id, SealedBlob.key_version < version]
    if among is not None:
        scope.append(SealedBlob.key_version.in_(among))
    return list(session.scalars(select(SealedBlob).where(*scope).order_by(SealedBlob.seq).limit(limit)))


def rewrap_blob(session: Session, *, blob_id: str, old_version: int, version: int, wrapped_key: str) -> bool:
    return session.execute(update(SealedBlob).where(SealedBlob.id == blob_id, SealedBlob.key_version == old_version)
                           .values(key_version=version, wrapped_key=wrapped_key)
                           .execution_options(synchronize_session=False)).rowcount == 1


# ---- crypto-shredding made permanent ---------------------------------------------------------------
#
# A holder of a tenant's bytes is what a reader asks for them as: a file id, an upload part id, or the id of
# the job whose registered files a model version or an export lists (registry_blobs). When bytes whose blob
# was wrapped under a shredded key are sealed again under a new key (registry/artifacts.py _commit_sealed),
# every holder they had until then is buried first: those stay unreadable for good, new holders read the
# new blob. No clock is compared: who is buried is decided in the transaction that replaces the blob, under
# the tenant's lock, before the new holder's row exists ("the blob before the row", in every writer).


def holders_of(session: Session, *, tenant_id: str, sha256: str) -> set[str]:
    """Every holder the tenant has of these bytes: its file rows (deleted ones too), its uploads' parts, and
    the jobs of its versions and exports that list them."""
    files = select(File.id).where(File.tenant_id == tenant_id, File.sha256 == sha256)
    parts = select(UploadPart.id).where(UploadPart.sha256 == sha256, UploadPart.upload_id == Upload.id,
                                        Upload.tenant_id == tenant_id)
    owners = select(RegistryBlob.owner).where(RegistryBlob.sha256 == sha256)
    versions = select(ModelVersion.job_id).where(ModelVersion.tenant_id == tenant_id, ModelVersion.id.in_(owners),
                                                 ModelVersion.job_id.is_not(None))
    exports = select(ModelExport.job_id).where(ModelExport.tenant_id == tenant_id, ModelExport.id.in_(owners))
    return {holder for query in (files, parts, versions, exports) for holder in session.scalars(query)}


def bury_holders(session: Session, *, blob: SealedBlob) -> int:
    """Record every present holder of a blob whose tenant key was shredded (before it is replaced); those
    recorded by an earlier shredding of the same bytes stay. Returns how many were added."""
    holders = holders_of(session, tenant_id=blob.tenant_id, sha256=blob.sha256)
    known = set(session.scalars(select(ShreddedHolder.holder).where(ShreddedHolder.tenant_id == blob.tenant_id,
                                                                    ShreddedHolder.sha256 == blob.sha256)))
    at = now()
    for holder in sorted(holders - known):
        session.add(ShreddedHolder(tenant_id=blob.tenant_id, sha256=blob.sha256, holder=holder, blob_id=blob.id,
                                   key_version=blob.key_version, created_at=at))
    session.flush()
    return len(holders - known)


def buried_holder(session: Session, *, tenant_id: str, sha256: str, holder: str | None) -> ShreddedHolder | None:
    """The burial that keeps this holder out of the tenant's bytes; with no holder named, any burial of these
    bytes (a reader that cannot say whose bytes it wants is refused whenever one exists: never a shredded
    holder let in)."""
    query = select(ShreddedHolder).where(ShreddedHolder.tenant_id == tenant_id, ShreddedHolder.sha256 == sha256)
    if holder is not None:
        query = query.where(ShreddedHolder.holder == holder)
    return session.scalar(query.order_by(ShreddedHolder.seq).limit(1))


def sole_version_job(session: Session, *, tenant_id: str, manifest_sha256: str) -> str | None:
    """The job of the tenant's only version with this manifest (None: none, several, or one with no job): the
    holder of a version's files for a reader that has only its manifest."""
    jobs = list(session.scalars(select(ModelVersion.job_id).where(ModelVersion.tenant_id == tenant_id,
                                                                  ModelVersion.manifest_sha256 == manifest_sha256)
                                .limit(2)))
    return jobs[0] if len(jobs) == 1 else None


def _files_keeping(sha256: str, deleted_after: int, active_statuses: tuple[str, ...], tenant_id: str | None):
    """Conditions under which file rows with these bytes keep them: live, deleted within the grace period,
    or named by a job that may still run."""
    scope = [File.sha256 == sha256] + ([File.tenant_id == tenant_id] if tenant_id is not None else [])
    with_blob = select(File.id).where(*scope)
    live = exists().where(*scope, or_(File.deleted_at.is_(None), File.deleted_at >= deleted_after))
    jobs = exists().where(Job.status.in_(active_statuses),
                          or_(Job.training_file.in_(with_blob), Job.validation_file.in_(with_blob)))
    return live, jobs


def sealed_blob_referenced(session: Session, *, tenant_id: str, sha256: str, deleted_after: int,
                           active_statuses: tuple[str, ...]) -> bool:
    """Whether the tenant's sealed blob of these bytes must stay: a file of the tenant with them is live,
    was deleted within the grace period or has a job that may still run; or a pending upload of the
    tenant has a part with them. Only the tenant's own rows count: nothing is shared across tenants."""
    live, jobs = _files_keeping(sha256, deleted_after, active_statuses, tenant_id)
    part = exists().where(UploadPart.sha256 == sha256, UploadPart.upload_id == Upload.id,
                          Upload.tenant_id == tenant_id, Upload.status == PENDING_UPLOAD)
    return bool(session.scalar(select(or_(live, jobs, part, _registry_holds(tenant_id, sha256)))))


def _registry_holds(tenant_id: str, sha256: str):
    """A live version or an export of the tenant has a file with these bytes (registry_blobs: a deleted
    version's rows are gone, an export's stay with it)."""
    owners = select(ModelVersion.id).where(ModelVersion.tenant_id == tenant_id).union_all(
        select(ModelExport.id).where(ModelExport.tenant_id == tenant_id))
    return exists().where(RegistryBlob.sha256 == sha256, RegistryBlob.owner.in_(owners))


def _registry_owner_tenants():
    """(owner, tenant) of every registry_blobs owner that belongs to a tenant: versions and exports (a registered
    base model, base:NAME, is the operator's)."""
    return select(ModelVersion.id.label("owner"), ModelVersion.tenant_id.label("tenant_id")).union_all(
        select(ModelExport.id, ModelExport.tenant_id)).subquery()


def plaintext_registry_referenced(session: Session, *, sha256: str) -> bool:
    """Whether a plaintext blob must stay for the registry: a registered base model holds it, or a version or
    export of a tenant whose copy of it is not sealed (an install from before sealing, or encryption at rest
    off) does."""
    owners = _registry_owner_tenants()
    base = exists().where(RegistryBlob.sha256 == sha256, ~RegistryBlob.owner.in_(select(owners.c.owner)))
    tenant = exists().where(RegistryBlob.sha256 == sha256, RegistryBlob.owner == owners.c.owner,
                            _not_sealed(owners.c.tenant_id, sha256))
    return bool(session.scalar(select(or_(base, tenant))))


def unsealed_registry_contents(session: Session, *, tenant_id: str | None = None) -> list[tuple[str, str]]:
    """(tenant, sha256) of every file of a version or export with no sealed copy of its tenant: what a re-seal
    of an upgraded install has to do for the registry."""
    owners = _registry_owner_tenants()
    scope = [RegistryBlob.owner == owners.c.owner, _not_sealed(owners.c.tenant_id, RegistryBlob.sha256)]
    if tenant_id is not None:
        scope.append(owners.c.tenant_id == tenant_id)
    query = select(owners.c.tenant_id, RegistryBlob.sha256).where(*scope)
    return sorted({tuple(row) for row in session.execute(query)})


def _not_sealed(tenant_column, sha256: str):
    return ~exists().where(SealedBlob.tenant_id == tenant_column, SealedBlob.sha256 == sha256)


def plaintext_blob_referenced(session: Session, *, sha256: str, deleted_after: int,
                              active_statuses: tuple[str, ...]) -> bool:
    """Whether a plaintext upload blob (artifacts/sha256/, an install from before sealing, or encryption at
    rest off) must stay for a file or part: as files.blob_referenced and uploads.part_blob_pending, except
    that a tenant whose copy is sealed no longer needs it. (Model versions' references are the caller's.)"""
    scope = [File.sha256 == sha256, _not_sealed(File.tenant_id, sha256)]
    live = exists().where(*scope, or_(File.deleted_at.is_(None), File.deleted_at >= deleted_after))
    with_blob = select(File.id).where(*scope)
    jobs = exists().where(Job.status.in_(active_statuses),
                          or_(Job.training_file.in_(with_blob), Job.validation_file.in_(with_blob)))
    # A job launched before its file was sealed may be reading the plaintext blob where it is.
    any_file = select(File.id).where(File.sha256 == sha256)
    running = exists().where(Job.status == RUNNING,
                             or_(Job.training_file.in_(any_file), Job.validation_file.in_(any_file)))
    part = exists().where(UploadPart.sha256 == sha256, UploadPart.upload_id == Upload.id,
                          Upload.status == PENDING_UPLOAD, _not_sealed(Upload.tenant_id, sha256))
    return bool(session.scalar(select(or_(live, jobs, running, part))))


def unsealed_contents(session: Session, *, tenant_id: str | None = None) -> list[tuple[str, str]]:
    """(tenant, sha256) of every file row and pending upload part with no sealed copy: what a re-seal
    of an upgraded install has to do."""
    file_scope = [_not_sealed(File.tenant_id, File.sha256)] + ([File.tenant_id == tenant_id] if tenant_id else [])
    files = select(File.tenant_id, File.sha256).where(*file_scope)
    part_scope = [UploadPart.upload_id == Upload.id, Upload.status == PENDING_UPLOAD,
                  _not_sealed(Upload.tenant_id, UploadPart.sha256)] + ([Upload.tenant_id == tenant_id] if tenant_id else [])
    parts = select(Upload.tenant_id, UploadPart.sha256).where(and_(*part_scope))
    found = {tuple(row) for row in session.execute(files)} | {tuple(row) for row in session.execute(parts)}
    return sorted(found)


def tokenized_copy_needed(session: Session, *, sha256: str) -> bool:
    """Whether an unfinished job (running, queued, paused: it resumes) or a running sweep (its next trials) reads
    a file with these bytes, so its tokenized copy is still in use: sweep trials share one tokenization."""
    with_blob = select(File.id).where(File.sha256 == sha256)
    if session.scalar(select(exists().where(
            Job.status.in_(ACTIVE_STATUSES), or_(Job.training_file.in_(with_blob), Job.validation_file.in_(with_blob))))):
        return True
    ids = set(session.scalars(with_blob))
    for spec in session.scalars(select(Sweep.spec).where(Sweep.status == RUNNING)):
        dataset = ((spec or {}).get("base") or {}).get("dataset") or {}
        if ids & {dataset.get("path"), dataset.get("validation_path")}:
            return True
    return False


# ---- job directories sealed at rest ------------------------------------------------------------------


def find_job_key(session: Session, *, job_id: str) -> SealedJobKey | None:
    return session.get(SealedJobKey, job_id)


def add_job_key(session: Session, *, job_id: str, tenant_id: str, key_version: int, wrapped_key: str) -> SealedJobKey:
    row = SealedJobKey(job_id=job_id, tenant_id=tenant_id, key_version=key_version, wrapped_key=wrapped_key,
                       created_at=now())
    session.add(row)
    session.flush()
    return row


def job_keys_wrapped_under_older(session: Session, *, tenant_id: str, version: int, among: list[int] | None = None,
                                 limit: int = 500) -> list[SealedJobKey]:
    """As db/keys.py objects_wrapped_under_older, for job directories' data keys."""
    scope = [SealedJobKey.tenant_id == tenant_id, SealedJobKey.key_version < version]
    if among is not None:
        scope.append(SealedJobKey.key_version.in_(among))
    return list(session.scalars(select(SealedJobKey).where(*scope).order_by(SealedJobKey.job_id).limit(limit)))


def rewrap_job_key(session: Session, *, job_id: str, old_version: int, version: int, wrapped_key: str) -> bool:
    return session.execute(update(SealedJobKey).where(SealedJobKey.job_id == job_id,
                                                      SealedJobKey.key_version == old_version)
                           .values(key_version=version, wrapped_key=wrapped_key)
                           .execution_options(synchronize_session=False)).rowcount == 1
