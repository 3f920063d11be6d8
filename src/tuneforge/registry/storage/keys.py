"""Tenant keys (key encryption keys): the KeyProvider interface and its key-folder implementation.

A provider wraps and unwraps data keys under a tenant's key version and never hands the key out, so a
KMS (AWS KMS Encrypt/Decrypt, Vault transit) fits the same interface: wrapping happens there. The
folder provider keeps each version as 32 random bytes in keys/<tenant>/v<N>.key (folder 0700, file 0600).
Deleting a version, or all of a tenant's (shred), makes what was wrapped under it unreadable for good.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Protocol

from tuneforge.registry.storage.envelope import unwrap_key, wrap_key

TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class KeyUnavailable(LookupError):
    """The tenant key version is gone (shredded or retired): what it wrapped cannot be read."""


class KeyProvider(Protocol):
    def new_version(self, tenant_id: str, *, after: int = 0) -> int: ...
    def versions(self, tenant_id: str) -> list[int]: ...
    def wrap(self, tenant_id: str, version: int, data_key: bytes, *, context: bytes) -> bytes: ...
    def unwrap(self, tenant_id: str, version: int, wrapped: bytes, *, context: bytes) -> bytes: ...
    def destroy_version(self, tenant_id: str, version: int) -> None: ...
    def shred(self, tenant_id: str) -> None: ...


class FolderKeyProvider:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _folder(self, tenant_id: str) -> Path:
        if not TENANT_NAME.match(tenant_id):
            raise ValueError(f"not a tenant id: {tenant_id!r}")
        return self.root / tenant_id

    def new_version(self, tenant_id: str, *, after: int = 0) -> int:
        """A new key version, numbered past every version here and past `after` (the highest ever recorded,
        so a tenant that was shredded never gets an old number back)."""
        folder = self._folder(tenant_id)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        while True:
            version = max([after, *self.versions(tenant_id)]) + 1
            try:  # O_EXCL: two processes rotating at once get different versions, never one overwritten
                fd = os.open(folder / f"v{version}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            with os.fdopen(fd, "wb") as out:
                out.write(os.urandom(32))
                out.flush()
                os.fsync(out.fileno())
            return version

    def versions(self, tenant_id: str) -> list[int]:
        folder = self._folder(tenant_id)
        found = []
        for path in folder.glob("v*.key") if folder.is_dir() else []:
            if path.stem[1:].isdigit() and path.stat().st_size == 32:
                found.append(int(path.stem[1:]))
        return sorted(found)

    def _key(self, tenant_id: str, version: int) -> bytes:
        try:
            return (self._folder(tenant_id) / f"v{int(version)}.key").read_bytes()
        except FileNotFoundError:
            raise KeyUnavailable(f"tenant {tenant_id}'s key version {version} no longer exists") from None

    def wrap(self, tenant_id: str, version: int, data_key: bytes, *, context: bytes) -> bytes:
        return wrap_key(self._key(tenant_id, version), data_key, context=context)

    def unwrap(self, tenant_id: str, version: int, wrapped: bytes, *, context: bytes) -> bytes:
        return unwrap_key(self._key(tenant_id, version), wrapped, context=context)

    def destroy_version(self, tenant_id: str, version: int) -> None:
        (self._folder(tenant_id) / f"v{int(version)}.key").unlink(missing_ok=True)

    def shred(self, tenant_id: str) -> None:
        shutil.rmtree(self._folder(tenant_id), ignore_errors=True)
