"""The artifact store: blobs kept by their SHA-256, so the same upload twice is stored once.

root/sealed/TENANT/ab/ID   a tenant's uploads, sealed at rest (envelope encryption, a data key per blob wrapped
                           under the tenant's key; the row in sealed_blobs holds it): once per tenant and content,
                           never shared across tenants. Written encrypted as the upload streams in, so the
                           plaintext never reaches the disk here; read back decrypted (open_content).
root/sha256/ab/abcdef...   plaintext blobs: model registry files, and the uploads of an install from before
                           sealing or with TUNEFORGE_ENCRYPT_AT_REST=false (`tuneforge storage seal-artifacts`
                           seals those)
root/staging/XXXX/         an upload being written, or a validation at work; each folder is held by an flock
                           on its .lock while its process lives, so a sweep removes only dead processes' folders
root/trash/                a blob the collector is removing (renamed out of place first; see remove_unreferenced)

A blob appears only complete: uploads are staged beside the store, hashed while they stream in, fsynced
and renamed into place. A failed or oversized upload leaves nothing behind. Deleting a file never removes
its blob; the scheduler's collector does, once nothing refers to it (scheduler/blobs.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from tuneforge.registry.storage.keys import KeyProvider

CHUNK = 1 << 20
LOCK = ".lock"
SEALED = "sealed"


class ContentMissing(LookupError):
    """A file's bytes are not in the artifact folder (removed, or never here: another machine's folder)."""


class UploadTooLarge(ValueError):
    def __init__(self, limit: int):
        super().__init__(f"the file is larger than this server accepts ({limit:,} bytes)")
        self.limit = limit


@dataclass(frozen=True)
class Sealing:
    """What seals one staged upload: its tenant, the id its blob will have, and its data key (in memory only,
    wrapped under the tenant key when committed)."""

    tenant_id: str
    blob_id: str
    data_key: bytes

    @property
    def context(self) -> bytes:
        return blob_data_context(self.tenant_id, self.blob_id)


def blob_data_context(tenant_id: str, blob_id: str) -> bytes:
    """What each chunk of a sealed blob is bound to: a blob copied under another id or tenant fails."""
    return f"tuneforge-blob/{tenant_id}/{blob_id}".encode()


class StagedBlob:
    """An upload on local disk, hashed, not yet in the store: plaintext, or ciphertext when `sealing`."""

    def __init__(self, path: Path, sha256: str, size: int, sealing: Sealing | None = None):
        self.path, self.sha256, self.size, self.sealing = path, sha256, size, sealing


@dataclass(frozen=True)
class Content:
    """Where one tenant's upload bytes are: a sealed blob (its row's wrapped data key with it) or a plaintext
    blob. find_content gives it; open_content and write_plaintext read it."""

    tenant_id: str
    sha256: str
    path: Path
    blob_id: str | None = None
    key_version: int | None = None
    wrapped_key: str | None = None
    shredded: bool = False  # a holder's bytes sealed under a key since shredded: never readable again

    @property
    def sealed(self) -> bool:
        return self.blob_id is not None


class StagingFolder:
    """A private folder under root/staging, locked by this process (flock on its .lock) until removed.

    The lock dies with the process, so a sweep can tell a dead upload's leftovers (lock free) from a live
    one's (lock held) without guessing from ages."""

    def __init__(self, path: Path, lock_fd: int):
        self.path, self._lock_fd = path, lock_fd

    @classmethod
    def create(cls, staging_root: Path) -> StagingFolder:
        staging_root.mkdir(parents=True, exist_ok=True)
        while True:
            path = Path(tempfile.mkdtemp(dir=staging_root))
            try:
                fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
            except FileNotFoundError:
                continue  # a sweep took the folder between mkdtemp and open: take another
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A sweep may have locked, removed and released the folder just before our flock.
                if os.fstat(fd).st_ino == os.stat(path / LOCK).st_ino:
                    return cls(path, fd)
            except (BlockingIOError, FileNotFoundError):
                pass
            os.close(fd)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)


def sweep_staging(staging_root: Path) -> list[Path]:
    """Remove the staging folders no live process holds (uploads or validations that died); returns them."""
    removed = []
    for folder in sorted(staging_root.iterdir()) if staging_root.is_dir() else []:
        if not folder.is_dir():
            continue
        try:
            fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue  # gone already
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # a live upload or validation
        shutil.rmtree(folder, ignore_errors=True)  # while holding the lock: nobody can take the folder meanwhile
        os.close(fd)
        removed.append(folder)
    return removed


class StagingWriter:
    """An upload being written to its staging folder: counted, hashed and written as chunks arrive, so the
    size limit stops it at the first chunk past it. With `sealing`, what reaches the file is the envelope
    ciphertext (registry/storage/envelope.py: Sealer), the plaintext only hashed and counted on its way
    through. Not thread-safe; one writer per upload."""

    def __init__(self, folder: StagingFolder, *, max_bytes: int, name: str = "upload", sealing: Sealing | None = None):
        self.folder, self.max_bytes, self.sealing = folder, max_bytes, sealing
        self.path = folder.path / (name if sealing is None else "sealed")
        self.size = 0
        self._digest = hashlib.sha256()
        self._out = open(self.path, "wb")
        self._sink = self._out
        if sealing is not None:
            from tuneforge.registry.storage.envelope import Sealer

            self._sink = Sealer(self._out, sealing.data_key, context=sealing.context)

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise UploadTooLarge(self.max_bytes)
        self._digest.update(data)
        self._sink.write(data)

    def finish(self) -> StagedBlob:
        if self._sink is not self._out:
            self._sink.finish()
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        return StagedBlob(self.path, self._digest.hexdigest(), self.size, self.sealing)

    def discard(self) -> None:
        self._out.close()
        self.folder.remove()


class LocalArtifactStore:
    def __init__(self, root: Path, *, keys: KeyProvider | None = None, seal: bool | None = None):
        """keys: the tenant keys that open sealed blobs; seal: whether tenant uploads are written sealed
        (default: whenever keys are given). Without keys every blob is plaintext, as before sealing."""
        self.root = Path(root)
        self.staging_root = self.root / "staging"
        self.keys = keys
        self.seal = keys is not None if seal is None else seal
        if self.seal and keys is None:
            raise ValueError("sealing uploads needs tenant keys")

    @classmethod
    def from_settings(cls, settings) -> LocalArtifactStore:
        """The artifact folder TUNEFORGE_ARTIFACTS_DIR names, sealing uploads under the tenant keys of
        TUNEFORGE_KEYS_DIR unless TUNEFORGE_ENCRYPT_AT_REST=false (sealed blobs stay readable then)."""
        from tuneforge.registry.storage.keys import FolderKeyProvider

        keys = FolderKeyProvider(Path(settings.keys_dir)) if settings.keys_dir else None
        if settings.encrypt_at_rest and keys is None:
            raise ValueError("encryption at rest needs a keys folder (TUNEFORGE_KEYS_DIR)")
        return cls(settings.artifacts_dir, keys=keys, seal=bool(settings.encrypt_at_rest))

    def path_of(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).is_file()

    def open_staging(self, *, max_bytes: int, name: str = "upload", tenant_id: str | None = None) -> StagingWriter:
        """A writer for one upload in a new locked staging folder; finish() then commit(), or discard().
        With a tenant (an upload's bytes, not a model file) and sealing on, it writes ciphertext."""
        sealing = None
        if tenant_id is not None and self.seal:
            from tuneforge.db.identifiers import new_id
            from tuneforge.db.sealed_blobs import BLOB
            from tuneforge.registry.storage.envelope import new_data_key

            self.sealed_folder(tenant_id)  # a tenant id that cannot name a folder fails here, before any byte
            sealing = Sealing(tenant_id=tenant_id, blob_id=new_id(BLOB), data_key=new_data_key())
        return StagingWriter(StagingFolder.create(self.staging_root), max_bytes=max_bytes, name=name, sealing=sealing)

    def work_folder(self) -> StagingFolder:
        """A locked scratch folder in staging (for a validation); removed by its owner, or swept once it dies."""
        return StagingFolder.create(self.staging_root)

    @contextmanager
    def staging(self, stream: BinaryIO, *, filename: str, max_bytes: int) -> Iterator[StagedBlob]:
        """Copy a stream to a staging file named like the upload (so data problems name the user's file)."""
        name = Path(filename).name
        writer = self.open_staging(max_bytes=max_bytes, name=name if name not in ("", ".", "..", LOCK) else "upload")
        try:
            while chunk := stream.read(CHUNK):
                writer.write(chunk)
            yield writer.finish()
        finally:
            writer.discard()

    def commit(self, staged: StagedBlob, *, session: Session | None = None) -> Path:
        """Move a staged blob into the store, or, when the same content is already there, refresh its mtime:
        the collector removes only blobs older than its grace period, so bytes just committed stay.
        A sealed upload is committed in `session` (its row, beside the file row the caller adds)."""
        if staged.sealing is not None:
            if session is None:
                raise ValueError("a sealed upload is committed within the session that records its file")
            return self._commit_sealed(session, staged)
        target = self.path_of(staged.sha256)
        try:
            os.utime(target)
            return target
        except FileNotFoundError:
            pass
        target.parent.mkdir(parents=True, exist_ok=True)
        os.utime(staged.path)
        os.replace(staged.path, target)
        return target

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path_of(sha256), "rb")

    # ---- sealed uploads ------------------------------------------------------------------------------

    def sealed_folder(self, tenant_id: str) -> Path:
        from tuneforge.registry.storage.keys import TENANT_NAME

        if not TENANT_NAME.match(tenant_id):
            raise ValueError(f"not a tenant id: {tenant_id!r}")
        return self.root / SEALED / tenant_id

    def sealed_path(self, tenant_id: str, blob_id: str) -> Path:
        if not blob_id.isascii() or not blob_id.replace("_", "").isalnum():
            raise ValueError(f"not a blob id: {blob_id!r}")
        return self.sealed_folder(tenant_id) / blob_id[-2:] / blob_id

    def _commit_sealed(self, session: Session, staged: StagedBlob) -> Path:
        from tuneforge.db import sealed_blobs as blob_rows
        from tuneforge.db import tenants as tenant_rows
        from tuneforge.registry.storage.tenant_keys import blob_wrap_context, version_for_writing, wrap

        sealing = staged.sealing
        tenant_rows.lock_tenant(session, tenant_id=sealing.tenant_id)  # one commit of a tenant's bytes at a time
        found = blob_rows.find_blob(session, tenant_id=sealing.tenant_id, sha256=staged.sha256)
        if found is not None:
            path = self.sealed_path(found.tenant_id, found.id)
            if self._opens(found) and path.is_file() and blob_rows.touch_blob(session, blob_id=found.id):
                return path  # stored once per tenant: ours is discarded with the staging folder
            if not self._opens(found):  # whoever had these bytes until now stays out of ours for good (find_content)
                blob_rows.bury_holders(session, blob=found)
            blob_rows.drop_blob(session, blob_id=found.id)  # its file is gone, or its key was shredded: ours replaces it
            path.unlink(missing_ok=True)
        version = version_for_writing(session, self.keys, sealing.tenant_id)
        wrapped = wrap(self.keys, sealing.tenant_id, version, sealing.data_key,
                       blob_wrap_context(sealing.tenant_id, sealing.blob_id, version))
        target = self.sealed_path(sealing.tenant_id, sealing.blob_id)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.utime(staged.path)  # the orphan sweep goes by age: a blob whose row is being committed is new
        os.replace(staged.path, target)
        blob_rows.add_blob(session, blob_id=sealing.blob_id, tenant_id=sealing.tenant_id, sha256=staged.sha256,
                           size=staged.size, key_version=version, wrapped_key=wrapped)
        return target

    def _opens(self, row) -> bool:
        """Whether the tenant key version that wrapped a sealed blob's data key still exists."""
        return self.keys is not None and row.key_version in self.keys.versions(row.tenant_id)

    def find_content(self, session: Session, *, tenant_id: str, sha256: str,
                     holder: str | None = None) -> Content | None:
        """Where the tenant's bytes with this digest are for holder (the file id, upload part id, or the id of
        the job whose registered files a version or an export lists, that asks for them): its sealed blob, else
        a plaintext blob (an upload from before sealing, or with sealing off); None when neither is recorded here.
        The row decides, never the file's first bytes: a sealed blob starts with the envelope's magic (TFE1), but
        so may a plaintext upload.

        Crypto-shredding is for good: a holder that had the bytes when their key was shredded gets them as
        shredded (open_content raises KeyUnavailable) even once the same bytes are sealed again under a new key;
        only holders that came after read the new blob. A reader that names no holder gets them as shredded
        whenever any holder of these bytes was shredded (db/sealed_blobs.py buried_holder)."""
        from tuneforge.db import sealed_blobs as blob_rows

        buried = blob_rows.buried_holder(session, tenant_id=tenant_id, sha256=sha256, holder=holder)
        if buried is not None:
            return Content(tenant_id=tenant_id, sha256=sha256, path=self.sealed_path(tenant_id, buried.blob_id),
                           blob_id=buried.blob_id, key_version=buried.key_version, shredded=True)
        row = blob_rows.find_blob(session, tenant_id=tenant_id, sha256=sha256)
        if row is not None:
            return Content(tenant_id=tenant_id, sha256=sha256, path=self.sealed_path(tenant_id, row.id), blob_id=row.id,
                           key_version=row.key_version, wrapped_key=row.wrapped_key)
        if self.exists(sha256):
            return Content(tenant_id=tenant_id, sha256=sha256, path=self.path_of(sha256))
        return None

    def open_content(self, content: Content) -> BinaryIO:
        """The plaintext, read as a stream: decrypted chunk by chunk (each authenticated before its bytes are
        returned; memory bounded by two 1 MiB chunks) for a sealed blob. Raises ContentMissing,
        KeyUnavailable (the tenant key was destroyed: crypto-shredded) or DecryptionFailed (tampered)."""
        if content.shredded:  # before the path: the shredded blob's file may be gone, its key is
            from tuneforge.registry.storage.keys import KeyUnavailable

            raise KeyUnavailable(f"tenant {content.tenant_id}'s key version {content.key_version} that sealed the "
                                 f"content {content.sha256[:12]} was destroyed (crypto-shredded)")
        try:
            source = open(content.path, "rb")
        except FileNotFoundError:
            raise ContentMissing(f"the content {content.sha256[:12]} of tenant {content.tenant_id} is not in the "
                                 "artifact folder") from None
        if not content.sealed:
            return source
        try:
            from tuneforge.registry.storage.envelope import SealedReader
            from tuneforge.registry.storage.tenant_keys import blob_wrap_context, unwrap

            if self.keys is None:
                raise ValueError("this upload is sealed, and no tenant keys are configured (TUNEFORGE_KEYS_DIR)")
            data_key = unwrap(self.keys, content.tenant_id, content.key_version, content.wrapped_key,
                              blob_wrap_context(content.tenant_id, content.blob_id, content.key_version))
            return SealedReader(source, data_key, context=blob_data_context(content.tenant_id, content.blob_id))
        except BaseException:
            source.close()
            raise

    def write_plaintext(self, content: Content, dest: Path) -> Path:
        """The plaintext at dest (0600), written beside it and renamed: a failure (a shredded key, a tampered
        blob) leaves nothing at dest and no partial copy."""
        partial = dest.with_name(dest.name + ".partial")
        try:
            with self.open_content(content) as source:
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
            os.replace(partial, dest)
            return dest
        finally:
            partial.unlink(missing_ok=True)

    def sealed_blob_files(self) -> Iterator[tuple[str, str, Path]]:
        """(tenant, blob id, path) of every sealed blob file here (the collector compares them with the rows)."""
        for tenant in sorted((self.root / SEALED).glob("*")):
            for path in sorted(tenant.glob("??/*")):
                if path.is_file():
                    yield tenant.name, path.name, path

    def blobs_older_than(self, cutoff: float) -> Iterator[str]:
        """Digests of the blobs last committed before cutoff (Unix seconds)."""
        for prefix in sorted((self.root / "sha256").glob("??")):
            for blob in sorted(prefix.iterdir()):
                try:
                    if blob.stat().st_mtime < cutoff:
                        yield blob.name
                except FileNotFoundError:
                    continue

    def remove_unreferenced(self, sha256: str, *, cutoff: float, referenced: Callable[[], bool]) -> bool:
        """Remove a blob when referenced() is False and nobody committed it since cutoff; True when removed.

        Race-free against an upload of the same bytes (commit, then its file row): the blob is renamed out of
        place first, atomically. An upload committing after the rename finds no blob and puts its own copy in
        place; one that committed before it refreshed the mtime, which is checked after the rename, and then
        the blob goes back (identical bytes, whichever copy lands)."""
        if referenced():
            return False
        path = self.path_of(sha256)
        trash = self.root / "trash"
        trash.mkdir(parents=True, exist_ok=True)
        held = trash / f"{sha256}.{secrets.token_hex(4)}"
        try:
            os.rename(path, held)
        except FileNotFoundError:
            return False
        try:
            keep = held.stat().st_mtime >= cutoff or referenced()
        except FileNotFoundError:
            return False  # another collector's recovery put it back
        except BaseException:
            os.replace(held, path)  # a database error: keep the blob, decide next time
            raise
        if keep:
            os.replace(held, path)
            return False
        held.unlink(missing_ok=True)
        return True

    def recover_trash(self) -> list[str]:
        """Put back blobs a collector that died had renamed out of place (the next pass decides again)."""
        restored = []
        for held in sorted((self.root / "trash").glob("*")):
            sha256 = held.name.split(".")[0]
            try:
                target = self.path_of(sha256)
            except ValueError:
                continue  # not ours
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(held, target)
            restored.append(sha256)
        return restored
