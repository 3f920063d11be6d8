"""A tenant's key versions over everything they seal: the object store's objects, the artifact folder's
sealed blobs and the job directories sealed at rest. Writing picks (or creates) the live version; rotation
re-wraps every data key of them all under a new version before the old ones are destroyed; shredding
destroys every version."""

from __future__ import annotations

import base64

from sqlalchemy.orm import Session

from tuneforge.db import keys as key_rows
from tuneforge.db import sealed_blobs as blob_rows
from tuneforge.db.session import Database
from tuneforge.registry.storage.keys import KeyProvider


def object_wrap_context(tenant_id: str, object_id: str, version: int) -> bytes:
    return f"tuneforge-key/{tenant_id}/{object_id}/v{version}".encode()


def blob_wrap_context(tenant_id: str, blob_id: str, version: int) -> bytes:
    return f"tuneforge-blob-key/{tenant_id}/{blob_id}/v{version}".encode()


def job_key_context(tenant_id: str, job_id: str, version: int) -> bytes:
    return f"tuneforge-job-key/{tenant_id}/{job_id}/v{version}".encode()


def version_for_writing(session: Session, keys: KeyProvider, tenant_id: str) -> int:
    """The tenant's newest live key version, created (in this transaction) when it has none: its first
    write, or its first after a shredding (numbered past every version it ever had)."""
    version = key_rows.current_key_version(session, tenant_id=tenant_id)
    if version is not None and version in keys.versions(tenant_id):
        return version
    version = keys.new_version(tenant_id, after=key_rows.highest_key_version(session, tenant_id=tenant_id))
    key_rows.add_key_version(session, tenant_id=tenant_id, version=version)
    return version


def wrap(keys: KeyProvider, tenant_id: str, version: int, data_key: bytes, context: bytes) -> str:
    return base64.b64encode(keys.wrap(tenant_id, version, data_key, context=context)).decode()


def unwrap(keys: KeyProvider, tenant_id: str, version: int, wrapped: str, context: bytes) -> bytes:
    """The data key (raises KeyUnavailable when the version is destroyed: shredded, or retired)."""
    return keys.unwrap(tenant_id, version, base64.b64decode(wrapped), context=context)


class TenantKeys:
    def __init__(self, db: Database, keys: KeyProvider):
        self.db, self.keys = db, keys

    def rotate(self, tenant_id: str) -> int:
        """A new tenant key version; every data key (objects and sealed blobs) is re-wrapped under it, rows
        only, then the older versions are destroyed. Returns the new version."""
        with self.db.session() as session:
            version = self.keys.new_version(tenant_id, after=key_rows.highest_key_version(session, tenant_id=tenant_id))
            key_rows.add_key_version(session, tenant_id=tenant_id, version=version)
        self._rewrap_all(tenant_id, version)
        with self.db.session() as session:
            old = [v for v in key_rows.live_key_versions(session, tenant_id=tenant_id) if v < version]
            key_rows.retire_key_versions(session, tenant_id=tenant_id, versions=old)
        self._rewrap_all(tenant_id, version)  # what a write wrapped under an old version before it saw the retirement
        for old_version in old:  # only now: until every data key was re-wrapped, the old version still opens them
            self.keys.destroy_version(tenant_id, old_version)
        return version

    def _rewrap_all(self, tenant_id: str, version: int) -> None:
        """Re-wrap under version every data key wrapped under an older version the provider still holds: one
        destroyed (a shredding) wrapped data keys nobody can open any more, and those stay as they are."""
        while True:
            held = [v for v in self.keys.versions(tenant_id) if v < version]
            if not held:
                return
            with self.db.session() as session:
                objects = key_rows.objects_wrapped_under_older(session, tenant_id=tenant_id, version=version,
                                                               among=held)
                for obj in objects:
                    data_key = unwrap(self.keys, tenant_id, obj.key_version, obj.wrapped_key,
                                      object_wrap_context(tenant_id, obj.id, obj.key_version))
                    key_rows.rewrap_object(session, object_id=obj.id, old_version=obj.key_version, version=version,
                                           wrapped_key=wrap(self.keys, tenant_id, version, data_key,
                                                            object_wrap_context(tenant_id, obj.id, version)))
                blobs = blob_rows.blobs_wrapped_under_older(session, tenant_id=tenant_id, version=version, among=held)
                for blob in blobs:
                    data_key = unwrap(self.keys, tenant_id, blob.key_version, blob.wrapped_key,
                                      blob_wrap_context(tenant_id, blob.id, blob.key_version))
                    blob_rows.rewrap_blob(session, blob_id=blob.id, old_version=blob.key_version, version=version,
                                          wrapped_key=wrap(self.keys, tenant_id, version, data_key,
                                                           blob_wrap_context(tenant_id, blob.id, version)))
                jobs = blob_rows.job_keys_wrapped_under_older(session, tenant_id=tenant_id, version=version,
                                                              among=held)
                for job in jobs:  # the data keys of job directories sealed at rest (registry/storage/job_files.py)
                    data_key = unwrap(self.keys, tenant_id, job.key_version, job.wrapped_key,
                                      job_key_context(tenant_id, job.job_id, job.key_version))
                    blob_rows.rewrap_job_key(session, job_id=job.job_id, old_version=job.key_version, version=version,
                                             wrapped_key=wrap(self.keys, tenant_id, version, data_key,
                                                              job_key_context(tenant_id, job.job_id, version)))
            if not objects and not blobs and not jobs:
                return

    def shred(self, tenant_id: str) -> None:
        """Crypto-shredding: destroy every version of the tenant's key. Its objects and sealed blobs stay as
        ciphertext nobody can open; removing them is then only about space. For good: the same bytes stored
        again later under a new key never open for what had them now (LocalArtifactStore.find_content's
        buried holders, TenantStore.put's set-aside objects)."""
        self.keys.shred(tenant_id)
        with self.db.session() as session:
            key_rows.retire_key_versions(session, tenant_id=tenant_id,
                                         versions=key_rows.live_key_versions(session, tenant_id=tenant_id))
