"""Model files in the artifact store: a directory becomes a manifest of blobs, and a manifest a directory again.

A manifest lists every file of a model version with its SHA-256 and size, sorted by path; its own digest
(the SHA-256 of its canonical JSON) names the version's content. Each file is a blob of the store, so a
file two versions share (a tokenizer, the same base weights) is stored once. Materializing writes the
files out under TUNEFORGE_HOME/registry/<manifest digest>/, checking every digest on the way, and renames
the folder into place only when complete, so a reader never sees half a model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from tuneforge.registry.artifacts import CHUNK, LocalArtifactStore
from tuneforge.spec.jobdir import BASE_OF_ADAPTER  # beside a materialized adapter, outside its manifest

MAX_MODEL_FILE_BYTES = 1 << 42  # 4 TiB: bounded by the disk, not by an upload limit
COMPLETE = ".complete"


class ManifestMismatch(ValueError):
    """A file whose bytes are not the ones its manifest names."""


def manifest_digest(manifest: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def store_directory(store: LocalArtifactStore, directory: Path) -> tuple[dict[str, Any], str]:
    """Every regular file under directory into the store; returns (manifest, its digest). Symbolic links
    are refused: a model's files are its own bytes, never a pointer elsewhere on the server."""
    files = []
    for path in sorted(p for p in directory.rglob("*") if not p.is_dir() or p.is_symlink()):
        relative = path.relative_to(directory).as_posix()
        if path.is_symlink() or not path.is_file():
            raise ValueError(f"{relative}: not a regular file (a model directory holds only regular files)")
        with open(path, "rb") as handle:
            sha256, size = _put(store, handle)
        files.append({"path": relative, "sha256": sha256, "bytes": size})
    if not files:
        raise ValueError(f"{directory.name}: the directory holds no files")
    manifest = {"files": files}
    return manifest, manifest_digest(manifest)


def _put(store: LocalArtifactStore, stream: BinaryIO) -> tuple[str, int]:
    writer = store.open_staging(max_bytes=MAX_MODEL_FILE_BYTES, name="blob")
    try:
        while chunk := stream.read(CHUNK):
            writer.write(chunk)
        staged = writer.finish()
        store.commit(staged)
        return staged.sha256, staged.size
    finally:
        writer.discard()


def _safe_relative(path: str) -> PurePosixPath:
    relative = PurePosixPath(path)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ManifestMismatch(f"manifest path {path!r} leaves the model directory")
    return relative


def write_files(store: LocalArtifactStore, manifest: dict[str, Any], target: Path) -> None:
    """The manifest's files under target (which must not exist yet), each checked against its digest."""
    for entry in manifest["files"]:
        out = target / _safe_relative(entry["path"])
        out.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        with store.open(entry["sha256"]) as source, open(out, "wb") as sink:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                sink.write(chunk)
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


def materialize(store: LocalArtifactStore, manifest: dict[str, Any], root: Path, *, base: str | None = None) -> Path:
    """A directory holding the manifest's files, root/<digest>[-on-<base digest>]: written once, reused after.
    base (an adapter's base model: a built-in name or a directory) goes into BASE_OF_ADAPTER."""
    digest = manifest_digest(manifest)
    name = digest if base is None else f"{digest}-on-{hashlib.sha256(base.encode()).hexdigest()[:16]}"
    final = root / name
    if (final / COMPLETE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".staging-"))
    try:
        write_files(store, manifest, staging)
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
