"""Model files in the store: manifests name every file by its SHA-256, identical files are stored once,
a materialized version is byte-identical to its manifest and written once, and nothing outside a model
directory (a symbolic link, a manifest path that climbs out) gets in or out."""

from __future__ import annotations

import hashlib
import json

import pytest

from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.retention import retained_steps
from tuneforge.registry.versions import (
    ManifestMismatch,
    manifest_digest,
    materialize,
    store_directory,
    verify_directory,
    write_files,
)
from tuneforge.spec.jobdir import BASE_OF_ADAPTER


def model_dir(root, weights: bytes):
    root.mkdir()
    (root / "config.json").write_text('{"model_type": "llama"}')
    (root / "nested").mkdir()
    (root / "nested" / "tokenizer.json").write_text('{"v": 1}')
    (root / "model.safetensors").write_bytes(weights)
    return root


def blobs(store_root):
    return sorted(p.name for p in (store_root / "sha256").glob("*/*"))


def test_identical_files_are_stored_once_and_the_manifest_names_each_by_digest(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    first, digest = store_directory(store, model_dir(tmp_path / "a", b"one"))
    second, other = store_directory(store, model_dir(tmp_path / "b", b"two"))
    assert [f["path"] for f in first["files"]] == ["config.json", "model.safetensors", "nested/tokenizer.json"]
    assert first["files"][1] == {"path": "model.safetensors", "sha256": hashlib.sha256(b"one").hexdigest(), "bytes": 3}
    assert digest == manifest_digest(first) != other
    assert len(blobs(tmp_path / "store")) == 4  # config and tokenizer shared, two weights
    again, same = store_directory(store, model_dir(tmp_path / "c", b"one"))
    assert (again, same) == (first, digest) and len(blobs(tmp_path / "store")) == 4


def test_a_symbolic_link_or_an_empty_directory_is_refused(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    source = model_dir(tmp_path / "a", b"one")
    (source / "secret").symlink_to("/etc/passwd")
    with pytest.raises(ValueError, match="secret: not a regular file"):
        store_directory(store, source)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no files"):
        store_directory(store, tmp_path / "empty")


def test_materialize_writes_the_manifest_once_and_verify_finds_a_changed_file(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    manifest, digest = store_directory(store, model_dir(tmp_path / "a", b"weights"))
    out = materialize(store, manifest, tmp_path / "registry")
    assert out.name == digest and verify_directory(manifest, out) == []
    assert (out / "model.safetensors").read_bytes() == b"weights"
    (out / "model.safetensors").write_bytes(b"changed")
    problems = verify_directory(manifest, out)
    assert len(problems) == 1 and problems[0].startswith("model.safetensors: sha256 ")
    assert materialize(store, manifest, tmp_path / "registry") == out  # complete: reused, not rewritten
    adapter = materialize(store, manifest, tmp_path / "registry", base="tiny-llama")
    assert adapter != out and json.loads((adapter / BASE_OF_ADAPTER).read_text()) == {"base_model": "tiny-llama"}
    assert not [p for p in (tmp_path / "registry").iterdir() if p.name.startswith(".staging")]


def test_a_manifest_cannot_write_outside_its_directory_or_pass_off_other_bytes(tmp_path):
    store = LocalArtifactStore(tmp_path / "store")
    manifest, _ = store_directory(store, model_dir(tmp_path / "a", b"weights"))
    climbing = {"files": [{**manifest["files"][0], "path": "../escape.json"}]}
    with pytest.raises(ManifestMismatch, match="leaves the model directory"):
        write_files(store, climbing, tmp_path / "out")
    assert not (tmp_path / "escape.json").exists()
    lying = {"files": [{**manifest["files"][0], "bytes": 999}]}
    with pytest.raises(ManifestMismatch, match="do not match the manifest"):
        write_files(store, lying, tmp_path / "out2")


def test_retention_keeps_the_newest_and_the_best():
    assert retained_steps([2, 4, 6, 8], keep_last=2, best_step=2) == {2, 6, 8}
    assert retained_steps([2, 4, 6, 8], keep_last=1, best_step=None) == {8}
    assert retained_steps([2, 4], keep_last=5, best_step=9) == {2, 4}
