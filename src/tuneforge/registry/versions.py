"""Model files in the artifact store: a directory becomes a manifest of blobs, and a manifest a directory again.

A manifest lists every file of a model version with its SHA-256 and size, sorted by path; its own digest
(the SHA-256 of its canonical JSON) names the version's content. Each file is a blob of the store, so a
file two versions share (a tokenizer, the same base weights) is stored once. Materializing writes the
files out under TUNEFORGE_HOME/registry/<manifest digest>/ (or, for a tenant's version with encryption at rest,
into the reader's own folder: a job's inputs, a playground process's folder), checking every digest on the way, and
renames the folder into place only when complete, so a reader never sees half a model.

A tenant's version (its files and an export's) is stored sealed for that tenant with encryption at rest: each file a
sealed blob of the artifact folder (registry/artifacts.py, the sealed_blobs row its data key), deduplicated within the
tenant only. file_contents says where each file of a manifest is; write_files decrypts them as it writes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from tuneforge.registry.artifacts import CHUNK, Content, ContentMissing, LocalArtifactStore
from tuneforge.spec.jobdir import BASE_OF_ADAPTER  # beside a materialized adapter, outside its manifest

MAX_MODEL_FILE_BYTES = 1 << 42  # 4 TiB: bounded by the disk, not by an upload limit
COMPLETE = ".complete"


class ManifestMismatch(ValueError):
    """A file whose bytes are not the ones its manifest names."""


class ModelShredded(OSError):
    """A sealed model file whose tenant key was destroyed (crypto-shredded): it can never be read again."""


def manifest_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def store_directory(store: LocalArtifactStore, directory: Path, *, session=None,
                    tenant_id: str | None = None) -> tuple[dict[str, Any], str]:
    """Every regular file under directory into the store; returns (manifest, its digest). Symbolic links
    are refused: a model's files are its own bytes, never a pointer elsewhere on the server. With a tenant
    (and its session) and sealing on, each file is sealed for the tenant, committed in that session."""
    files = []
    for path in sorted(p for p in directory.rglob("*") if not p.is_dir() or p.is_symlink()):
        relative = path.relative_to(directory).as_posix()
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"{relative}: not a regular file (a model directory holds only regular files)")
        with open(path, "rb") as handle:
            sha256, size = put_stream(store, handle, session=session, tenant_id=tenant_id)
        files.append({"path": relative, "sha256": sha256, "bytes": size})
    if not files:
        raise ValueError(f"{directory.name}: the directory holds no files")
    manifest = {"files": files}
    return manifest, manifest_digest(manifest)


def put_stream(store: LocalArtifactStore, stream: BinaryIO, *, session=None,
               tenant_id: str | None = None) -> tuple[str, int]:
    """One model file into the store: sealed for tenant_id (committed in session) when sealing is on, else a
    plaintext blob (a registered base model, or encryption at rest off). Returns (sha256, size)."""
    sealed_for = tenant_id if session is not None else None
    writer = store.open_staging(max_bytes=MAX_MODEL_FILE_BYTES, name="blob", tenant_id=sealed_for)
    try:
        while chunk := stream.read(CHUNK):
            writer.write(chunk)
        staged = writer.finish()
        store.commit(staged, session=session)
        return staged.sha256, staged.size
    finally:
        writer.discard()


def file_contents(session, store: LocalArtifactStore, manifest: dict[str, Any], *,
                  tenant_id: str, holder: str | None = None) -> dict[str, Content]:
    """Where the tenant's bytes of each file of the manifest are (sha256 -> its sealed blob, or a plaintext blob
    of an install from before sealing); a file found nowhere is left out (write_files names it). holder: the job
    that registered the version (or export): one registered before its tenant's key was shredded gets its files
    as shredded for good, even once a later job registers the same bytes (LocalArtifactStore.find_content).
    Without one, the job of the tenant's only version with this manifest; when several versions have it, none
    is named, and bytes any holder of which was shredded come back shredded."""
    if holder is None:
        from tuneforge.db.sealed_blobs import sole_version_job

        holder = sole_version_job(session, tenant_id=tenant_id, manifest_sha256=manifest_digest(manifest))
    found = {}
    for entry in manifest["files"]:
        content = store.find_content(session, tenant_id=tenant_id, sha256=entry["sha256"], holder=holder)
        if content is not None:
            found[entry["sha256"]] = content
    return found


def check_readable(store: LocalArtifactStore, contents: dict[str, Content]) -> None:
    """ModelShredded when a sealed file's tenant key version is gone, before any byte is read."""
    for content in contents.values():
        if content.sealed and (store.keys is None or content.key_version not in store.keys.versions(content.tenant_id)):
            raise ModelShredded(f"the files of this model can no longer be read: tenant {content.tenant_id}'s "
                                "encryption key was destroyed (crypto-shredded)")


def _open_entry(store: LocalArtifactStore, entry: dict[str, Any], contents: dict[str, Content] | None) -> BinaryIO:
    if contents is None:
        return store.open(entry["sha256"])
    from tuneforge.registry.storage.envelope import DecryptionFailed
    from tuneforge.registry.storage.keys import KeyUnavailable

    content = contents.get(entry["sha256"])
    try:
        if content is None:
            raise ContentMissing(entry["path"])
        return store.open_content(content)
    except ContentMissing:
        raise FileNotFoundError(f"{entry['path']}: its bytes are not in the artifact folder") from None
    except KeyUnavailable:
        raise ModelShredded(f"{entry['path']} can no longer be read: tenant {content.tenant_id}'s encryption key was "
                            "destroyed (crypto-shredded)") from None
    except DecryptionFailed as exc:
        raise ManifestMismatch(f"{entry['path']}: the sealed blob does not authenticate ({exc})") from None


def _safe_relative(path: str) -> PurePosixPath:
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ManifestMismatch(f"manifest path {path!r} leaves the model directory")
    return relative


def write_files(store: LocalArtifactStore, manifest: dict[str, Any], target: Path, *,
                contents: dict[str, Content] | None = None) -> None:
    """The manifest's files under target (which must not exist yet), each checked against its digest; from
    contents (file_contents: a tenant's sealed blobs, decrypted chunk by chunk) when given, else the plaintext
    blobs. ModelShredded when a tenant key was destroyed, ManifestMismatch when a blob does not authenticate."""
    for entry in manifest["files"]:
        out = target / _safe_relative(entry["path"])
        out.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        with _open_entry(store, entry, contents) as source, open(out, "wb") as sink:
            try:
                while chunk := source.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    sink.write(chunk)
            except ValueError as exc:  # envelope.DecryptionFailed: a sealed chunk changed on disk
                raise ManifestMismatch(f"{entry['path']}: the sealed blob does not authenticate ({exc})") from None
        if digest.hexdigest() != entry["sha256"] or size != entry["bytes"]:
            raise ManifestMismatch(f"{entry['path']}: the stored bytes do not match the manifest "
                                   f"(sha256 {digest.hexdigest()}, expected {entry['sha256']})")


def verify_directory(manifest: dict[str, Any], directory: Path) -> list[str]:
    """What differs between directory and the manifest (empty: every file is there with its digest)."""
    problems = []
    for entry in manifest["files"]:
        path = directory / _safe_relative(entry["path"])
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 {digest.hexdigest()}, expected {entry['sha256']}")
    return problems


def materialize(store: LocalArtifactStore, manifest: dict[str, Any], root: Path, *, base: str | None = None,
                contents: dict[str, Content] | None = None) -> Path:
    """A directory holding the manifest's files, root/<digest>[-on-<base digest>]: written once, reused after.
    base (an adapter's base model: a built-in name or a directory) goes into BASE_OF_ADAPTER; contents as
    write_files takes them."""
    digest = manifest_digest(manifest)
    name = digest if base is None else f"{digest}-on-{hashlib.sha256(base.encode()).hexdigest()[:16]}"
    final = root / name
    if (final / COMPLETE).is_file():
        return final
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        write_files(store, manifest, staging, contents=contents)
        if base is not None:
            (staging / BASE_OF_ADAPTER).write_text(json.dumps({"base_model": base}))
        (staging / COMPLETE).write_text(digest)
        try:
            os.rename(staging, final)
        except OSError:  # another worker materialized it first: theirs is the same bytes
            if not (final / COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
