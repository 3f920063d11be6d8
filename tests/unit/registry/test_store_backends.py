"""The folder backend's side of the ObjectStore contract: atomic puts, resumable downloads, listing, and
keys that cannot leave the root (the S3 side is tests/integration/test_object_store.py)."""

from __future__ import annotations

import os

import pytest

from tuneforge.registry.storage.backends import FolderStore, ObjectMissing, StoreUrlError, open_store


def test_put_download_list_delete(tmp_path):
    store = FolderStore(tmp_path / "store")
    (tmp_path / "src").write_bytes(b"x" * 1000)
    store.put_file("t/ab/obj", tmp_path / "src")
    assert store.exists("t/ab/obj") and store.size("t/ab/obj") == 1000 and list(store.keys()) == ["t/ab/obj"]
    assert list(store.keys("t/")) == ["t/ab/obj"] and list(store.keys("u/")) == []
    assert not [p for p in (tmp_path / "store" / "t" / "ab").iterdir() if p.name.startswith(".put-")]
    store.download("t/ab/obj", tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == b"x" * 1000 and not (tmp_path / "dest.partial").exists()
    store.delete("t/ab/obj")
    with pytest.raises(ObjectMissing):
        store.open("t/ab/obj")
    for bad in ("../out", "/etc/passwd", "a//b", "a/./b", "a/../../b", ""):
        with pytest.raises(ValueError):
            store.put_file(bad, tmp_path / "src")
    assert not (tmp_path / "out").exists()


def test_download_continues_a_partial_file(tmp_path):
    store = FolderStore(tmp_path / "store")
    payload = os.urandom(5000)
    (tmp_path / "src").write_bytes(payload)
    store.put_file("obj", tmp_path / "src")
    (tmp_path / "dest.partial").write_bytes(payload[:1234])  # what an interrupted download left
    store.download("obj", tmp_path / "dest")
    assert (tmp_path / "dest").read_bytes() == payload


def test_store_urls():
    assert isinstance(open_store("file:///srv/tuneforge"), FolderStore)
    for bad in ("s3://", "file://relative/path", "gs://bucket", "/plain/path"):
        with pytest.raises(StoreUrlError):
            open_store(bad)
