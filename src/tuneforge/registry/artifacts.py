"""The artifact store: blobs kept by their SHA-256, so the same upload twice is stored once.

root/sha256/ab/abcdef...   the blobs (a local folder now; an S3-compatible store comes with the registry issue)
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
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20
LOCK = ".lock"


class UploadTooLarge(ValueError):
    def __init__(self, limit: int):
        super().__init__(f"the file is larger than this server accepts ({limit:,} bytes)")
        self.limit = limit


class StagedBlob:
    """An upload on local disk, hashed, not yet in the store."""

    def __init__(self, path: Path, sha256: str, size: int):
        self.path, self.sha256, self.size = path, sha256, size


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
    size limit stops it at the first chunk past it. Not thread-safe; one writer per upload."""

    def __init__(self, folder: StagingFolder, *, max_bytes: int, name: str = "upload"):
        self.folder, self.max_bytes = folder, max_bytes
        self.path = folder.path / name
        self.size = 0
        self._digest = hashlib.sha256()
        self._out = open(self.path, "wb")

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.max_bytes:
            raise UploadTooLarge(self.max_bytes)
        self._digest.update(data)
        self._out.write(data)

    def finish(self) -> StagedBlob:
        self._out.flush()
        os.fsync(self._out.fileno())
        self._out.close()
        return StagedBlob(self.path, self._digest.hexdigest(), self.size)

    def discard(self) -> None:
        self._out.close()
        self.folder.remove()


class LocalArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.staging_root = self.root / "staging"

    def path_of(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).is_file()

    def open_staging(self, *, max_bytes: int, name: str = "upload") -> StagingWriter:
        """A writer for one upload in a new locked staging folder; finish() then commit(), or discard()."""
        return StagingWriter(StagingFolder.create(self.staging_root), max_bytes=max_bytes, name=name)

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

    def commit(self, staged: StagedBlob) -> Path:
        """Move a staged blob into the store, or, when the same content is already there, refresh its mtime:
        the collector removes only blobs older than its grace period, so bytes just committed stay."""
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
