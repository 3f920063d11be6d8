"""The tenant-scoped object store: each object sealed with its own data key under the tenant's key.

Objects are addressed per tenant (sha256 of the tenant id and the content's sha256), deduplicated only
within a tenant, and kept at TENANT/ab/OBJECT_ID in the backend (a fresh id per write, so two writers
racing on one address never overwrite each other's ciphertext). The data key is stored wrapped, in the
object's row; rotating the tenant key re-wraps those rows and never touches the objects.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from tuneforge.db import keys as key_rows
from tuneforge.db.identifiers import new_id
from tuneforge.db.session import Database
from tuneforge.db.tables import StoredObject
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.storage.backends import ObjectStore
from tuneforge.registry.storage.envelope import decrypt_stream, encrypt_file, new_data_key
from tuneforge.registry.storage.keys import KeyProvider
from tuneforge.registry.storage.tenant_keys import TenantKeys, object_wrap_context, version_for_writing

CHUNK = 1 << 20


def tenant_address(tenant_id: str, sha256: str) -> str:
    """The address of content within one tenant: equal files of two tenants get unrelated addresses."""
    return hashlib.sha256(f"tuneforge-object\x00{tenant_id}\x00{sha256}".encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _data_context(tenant_id: str, object_id: str) -> bytes:
    return f"tuneforge-data/{tenant_id}/{object_id}".encode()


_wrap_context = object_wrap_context


class TenantStore:
    def __init__(self, db: Database, backend: ObjectStore, *, keys: KeyProvider | None, scratch: LocalArtifactStore):
        """keys None: objects are stored as they are (encryption at rest off)."""
        self.db, self.backend, self.keys, self.scratch = db, backend, keys, scratch

    # ---- writing ------------------------------------------------------------------------------------

    def put(self, *, tenant_id: str, path: Path, owner: str, name: str, kind: str) -> StoredObject:
        """Store a local file for the tenant (once per content) and link it as owner/name."""
        address = tenant_address(tenant_id, file_sha256(path))
        try:
            with self.db.session() as session:
                found = key_rows.find_object(session, tenant_id=tenant_id, address=address)
                if found is not None and self._readable(session, found):
                    key_rows.link_object(session, owner=owner, name=name, tenant_id=tenant_id, kind=kind,
                                         object_id=found.id)
                    return found
        except IntegrityError:
            pass  # the collector removed it between finding and linking (scheduler/blobs.py): store the bytes anew
        object_id = new_id(key_rows.OBJECT)
        location = f"{tenant_id}/{address[:2]}/{object_id}"
        data_key = version = None
        if self.keys is None:
            self.backend.put_file(location, path)
        else:
            version, data_key = self._current_version(tenant_id), new_data_key()
            folder = self.scratch.work_folder()  # swept if this process dies with ciphertext half-written
            try:
                sealed = folder.path / "sealed"
                encrypt_file(path, sealed, data_key, context=_data_context(tenant_id, object_id))
                self.backend.put_file(location, sealed)
            finally:
                folder.remove()
        try:
            with self.db.session() as session:
                found = key_rows.find_object(session, tenant_id=tenant_id, address=address)
                if found is not None and self._readable(session, found):  # another writer was first: theirs
                    key_rows.link_object(session, owner=owner, name=name, tenant_id=tenant_id, kind=kind,
                                         object_id=found.id)
                    self.backend.delete(location)
                    return found
                if found is not None and self._shredded(session, found):
                    # Its owners had it when the key was shredded: they keep their links to it, and stay out of ours.
                    key_rows.set_aside_object(session, obj=found)
                elif found is not None:  # its bytes went missing: ours replace them
                    key_rows.drop_object(session, obj=found)
                wrapped = None
                if data_key is not None:
                    # A rotation may have retired our version since we read it: wrap under the newest.
                    version = key_rows.current_key_version(session, tenant_id=tenant_id) or version
                    wrapped = base64.b64encode(self.keys.wrap(
                        tenant_id, version, data_key, context=_wrap_context(tenant_id, object_id, version))).decode()
                row = key_rows.add_object(session, object_id=object_id, tenant_id=tenant_id, address=address,
                                          location=location, size=path.stat().st_size, encrypted=data_key is not None,
                                          key_version=version, wrapped_key=wrapped)
                key_rows.link_object(session, owner=owner, name=name, tenant_id=tenant_id, kind=kind, object_id=row.id)
                return row
        except IntegrityError:  # another writer stored the same content first: use theirs, drop ours
            self.backend.delete(location)
            return self.put(tenant_id=tenant_id, path=path, owner=owner, name=name, kind=kind)

    def _readable(self, session, obj: StoredObject) -> bool:
        """Whether an existing object can stand for new content: its bytes are there, and its key lives
        (after crypto-shredding, the same content stored again must not dedupe onto unreadable ciphertext)."""
        if obj.encrypted and (self.keys is None or self._shredded(session, obj)):
            return False
        return self.exists(obj)

    def _shredded(self, session, obj: StoredObject) -> bool:
        """Whether the tenant key version that wrapped an encrypted object's data key is destroyed or retired
        (a rotation in progress re-wraps a retired version's data keys before destroying it)."""
        return bool(obj.encrypted and self.keys is not None and (
            obj.key_version not in key_rows.live_key_versions(session, tenant_id=obj.tenant_id)
            or obj.key_version not in self.keys.versions(obj.tenant_id)))

    def _current_version(self, tenant_id: str) -> int:
        with self.db.session() as session:
            return version_for_writing(session, self.keys, tenant_id)

    # ---- reading ------------------------------------------------------------------------------------

    def fetch(self, obj: StoredObject, dest: Path) -> Path:
        """The object's plaintext at dest (written beside, then renamed). The ciphertext is downloaded to
        dest.sealed first (resumable) and removed once decrypted; a failure leaves neither behind."""
        if not obj.encrypted:  # a dataset registered where it lies, or a store with encryption off
            backend, key = self.locate(obj.location)
            backend.download(key, dest)
            return dest
        if self.keys is None:
            raise ValueError("this object is encrypted, and no tenant keys are configured (TUNEFORGE_KEYS_DIR)")
        data_key = self.keys.unwrap(obj.tenant_id, obj.key_version, base64.b64decode(obj.wrapped_key),
                                    context=_wrap_context(obj.tenant_id, obj.id, obj.key_version))
        sealed, plain = dest.with_name(dest.name + ".sealed"), dest.with_name(dest.name + ".plain")
        try:
            self.backend.download(obj.location, sealed)
            with open(sealed, "rb") as src, open(plain, "wb") as out:
                decrypt_stream(src, out, data_key, context=_data_context(obj.tenant_id, obj.id))
            os.replace(plain, dest)
            return dest
        finally:
            sealed.unlink(missing_ok=True)
            plain.unlink(missing_ok=True)

    def locate(self, location: str) -> tuple[ObjectStore, str]:
        """The backend and key of a location: a key of this store, or the s3:// URI of a dataset an admin
        registered where it lies (tuneforge storage register-dataset)."""
        if location.startswith("s3://"):
            from tuneforge.registry.storage.backends import S3Store

            bucket, _, key = location.removeprefix("s3://").partition("/")
            return S3Store(bucket, client=getattr(self.backend, "client", None)), key
        return self.backend, location

    def exists(self, obj: StoredObject) -> bool:
        backend, key = self.locate(obj.location)
        return backend.exists(key)

    def linked(self, *, tenant_id: str, owner: str) -> dict[str, tuple[str, StoredObject]]:
        with self.db.read_session() as session:
            return key_rows.linked_objects(session, tenant_id=tenant_id, owner=owner)

    # ---- keys ---------------------------------------------------------------------------------------

    def rotate(self, tenant_id: str) -> int:
        """A new tenant key version; every data key is re-wrapped under it (the objects are not rewritten),
        then the older versions are destroyed. The artifact folder's sealed blobs are re-wrapped too (one
        key per tenant seals both: registry/storage/tenant_keys.py). Returns the new version."""
        if self.keys is None:
            raise ValueError("encryption at rest is off: there is no tenant key to rotate")
        return TenantKeys(self.db, self.keys).rotate(tenant_id)

    def shred(self, tenant_id: str) -> None:
        """Crypto-shredding: destroy every version of the tenant's key. Its objects (and its sealed blobs in
        the artifact folder) stay as ciphertext nobody can open; removing them is then only about space."""
        if self.keys is None:
            raise ValueError("encryption at rest is off: there is no tenant key to destroy")
        TenantKeys(self.db, self.keys).shred(tenant_id)


def open_tenant_store(db: Database, settings) -> TenantStore | None:
    """The tenant store TUNEFORGE_STORE_URL names, sealed with keys from keys_dir unless encryption at
    rest is off; None when no store is configured."""
    from tuneforge.registry.storage.backends import open_store
    from tuneforge.registry.storage.keys import FolderKeyProvider

    if not settings.store_url:
        return None
    backend = open_store(settings.store_url, endpoint_url=settings.s3_endpoint_url,
                         multipart_threshold=settings.s3_multipart_threshold_bytes)
    if settings.encrypt_at_rest and not settings.keys_dir:
        raise ValueError("encryption at rest needs a keys folder (TUNEFORGE_KEYS_DIR)")
    keys = FolderKeyProvider(Path(settings.keys_dir)) if settings.encrypt_at_rest else None
    return TenantStore(db, backend, keys=keys, scratch=LocalArtifactStore(settings.artifacts_dir))
