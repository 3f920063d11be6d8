"""The artifact store: blobs kept by their SHA-256, so the same upload twice is stored once.

root/sha256/ab/abcdef...   (a local folder now; an S3-compatible store comes with the registry issue)

A blob appears only complete: uploads are staged beside the store, hashed while they stream in, fsynced
and renamed into place. A failed or oversized upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


class UploadTooLarge(ValueError):
    def __init__(self, limit: int):
        super().__init__(f"the file is larger than this server accepts ({limit:,} bytes)")
        self.limit = limit


class StagedBlob:
    """An upload on local disk, hashed, not yet in the store."""

    def __init__(self, path: Path, sha256: str, size: int):
        self.path, self.sha256, self.size = path, sha256, size


class LocalArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)

    def path_of(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path_of(sha256).is_file()

    @contextmanager
    def staging(self, stream: BinaryIO, *, filename: str, max_bytes: int) -> Iterator[StagedBlob]:
        """Copy a stream to a staging file named like the upload (so data problems name the user's file)."""
        staging_root = self.root / "staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=staging_root))
        path = folder / (Path(filename).name or "upload")
        digest, size = hashlib.sha256(), 0
        try:
            with open(path, "wb") as out:
                while chunk := stream.read(CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise UploadTooLarge(max_bytes)
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            yield StagedBlob(path, digest.hexdigest(), size)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def commit(self, staged: StagedBlob) -> Path:
        """Move a staged blob into the store (a no-op when the same content is already there)."""
        target = self.path_of(staged.sha256)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged.path, target)
        return target

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path_of(sha256), "rb")

    def delete(self, sha256: str) -> None:
        self.path_of(sha256).unlink(missing_ok=True)
