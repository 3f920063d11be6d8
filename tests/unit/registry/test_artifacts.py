"""The artifact store's removal and staging under races: an upload of the same bytes racing the collector
keeps its blob whichever step it lands between, and a sweep removes only dead processes' staging folders."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

from tuneforge.registry.artifacts import LocalArtifactStore, StagingFolder, sweep_staging

CONTENT = b'{"text": "the same bytes"}\n'


def staged_blob(store: LocalArtifactStore):
    writer = store.open_staging(max_bytes=1 << 20)
    writer.write(CONTENT)
    return writer, writer.finish()


def committed_long_ago(store: LocalArtifactStore) -> str:
    writer, staged = staged_blob(store)
    store.commit(staged)
    writer.discard()
    old = time.time() - 3600
    os.utime(store.path_of(staged.sha256), (old, old))
    return staged.sha256


def test_an_unreferenced_old_blob_is_removed_and_a_referenced_or_young_one_kept(tmp_path):
    store = LocalArtifactStore(tmp_path)
    sha = committed_long_ago(store)
    cutoff = time.time() - 60
    assert not store.remove_unreferenced(sha, cutoff=cutoff, referenced=lambda: True) and store.exists(sha)
    young = time.time() - 7200  # a grace of two hours: committed an hour ago is young
    assert not store.remove_unreferenced(sha, cutoff=young, referenced=lambda: False) and store.exists(sha)
    assert store.remove_unreferenced(sha, cutoff=cutoff, referenced=lambda: False) and not store.exists(sha)
    assert list((tmp_path / "trash").iterdir()) == []


def test_an_upload_committing_between_the_check_and_the_rename_keeps_the_blob(tmp_path):
    store = LocalArtifactStore(tmp_path)
    sha = committed_long_ago(store)
    writer, staged = staged_blob(store)
    calls = []

    def referenced() -> bool:  # the collector's first check; the upload commits right after it
        calls.append(1)
        if len(calls) == 1:
            store.commit(staged)  # the blob exists: commit refreshes its mtime
        return False  # the upload's file row does not exist yet

    assert not store.remove_unreferenced(sha, cutoff=time.time() - 60, referenced=referenced)
    assert store.exists(sha) and store.open(sha).read() == CONTENT
    writer.discard()


def test_an_upload_committing_after_the_rename_keeps_its_own_copy(tmp_path):
    store = LocalArtifactStore(tmp_path)
    sha = committed_long_ago(store)
    writer, staged = staged_blob(store)
    calls = []

    def referenced() -> bool:
        calls.append(1)
        if len(calls) == 2:  # the check after the rename: the blob is out of place now
            store.commit(staged)  # finds no blob, so it moves its own copy in
        return False

    assert store.remove_unreferenced(sha, cutoff=time.time() - 60, referenced=referenced)  # the old copy went
    assert store.exists(sha) and store.open(sha).read() == CONTENT  # the upload's copy is in place
    writer.discard()


def test_blobs_a_dead_collector_left_in_the_trash_go_back(tmp_path):
    store = LocalArtifactStore(tmp_path)
    sha = committed_long_ago(store)
    (tmp_path / "trash").mkdir()
    os.rename(store.path_of(sha), tmp_path / "trash" / f"{sha}.dead")
    assert store.recover_trash() == [sha] and store.exists(sha)


def test_the_sweep_removes_dead_processes_staging_and_never_a_live_one(tmp_path):
    store = LocalArtifactStore(tmp_path)
    live = StagingFolder.create(store.staging_root)
    code = ("import sys; from pathlib import Path; from tuneforge.registry.artifacts import StagingFolder; "
            "f = StagingFolder.create(Path(sys.argv[1])); (f.path / 'upload').write_bytes(b'half'); print(f.path)")
    dead = subprocess.run([sys.executable, "-c", code, str(store.staging_root)], capture_output=True, text=True,
                          check=True).stdout.strip()  # exits without removing its folder, as a killed upload
    assert sorted(str(p) for p in store.staging_root.iterdir()) == sorted([str(live.path), dead])
    assert [str(p) for p in sweep_staging(store.staging_root)] == [dead]
    assert list(store.staging_root.iterdir()) == [live.path] and (live.path / ".lock").exists()
    live.remove()
    assert list(store.staging_root.iterdir()) == []


def test_a_staged_copy_of_a_stream_leaves_nothing_behind(tmp_path):
    store = LocalArtifactStore(tmp_path)
    with store.staging(io.BytesIO(CONTENT), filename="..", max_bytes=1 << 20) as staged:
        assert staged.path.name == "upload" and staged.path.read_bytes() == CONTENT
        store.commit(staged)
    assert list(store.staging_root.iterdir()) == [] and store.exists(staged.sha256)


def test_a_sealed_upload_never_writes_its_plaintext_and_reads_back_through_its_key(tmp_path):
    """With a tenant, staging writes envelope ciphertext as the bytes arrive; the plaintext comes back
    only through the tenant's key, a failed copy leaves nothing, and a shredded key opens nothing."""
    import hashlib

    import pytest

    from tuneforge.registry.artifacts import Content, ContentMissing
    from tuneforge.registry.storage.envelope import DecryptionFailed
    from tuneforge.registry.storage.keys import FolderKeyProvider, KeyUnavailable
    from tuneforge.registry.storage.tenant_keys import blob_wrap_context, wrap

    keys = FolderKeyProvider(tmp_path / "keys")
    store = LocalArtifactStore(tmp_path / "artifacts", keys=keys)
    plain = b"CANARY-0123456789 " * 200_000  # 3.6 MB: four chunks
    writer = store.open_staging(max_bytes=len(plain), tenant_id="tenant-a")
    for start in range(0, len(plain), 65_536):
        writer.write(plain[start:start + 65_536])
    staged = writer.finish()
    assert staged.sha256 == hashlib.sha256(plain).hexdigest() and staged.size == len(plain)
    assert b"CANARY" not in staged.path.read_bytes()
    with pytest.raises(ValueError, match="session"):
        store.commit(staged)  # its wrapped key is a row: committed with the file's row, never alone

    version = keys.new_version("tenant-a")
    blob_id = staged.sealing.blob_id
    content = Content(tenant_id="tenant-a", sha256=staged.sha256, path=staged.path, blob_id=blob_id, key_version=version,
                      wrapped_key=wrap(keys, "tenant-a", version, staged.sealing.data_key,
                                       blob_wrap_context("tenant-a", blob_id, version)))
    with store.open_content(content) as reader:
        assert reader.read() == plain
    dest = tmp_path / "out" / "copy"
    dest.parent.mkdir()
    assert store.write_plaintext(content, dest).read_bytes() == plain and oct(dest.stat().st_mode & 0o777) == "0o600"

    other_tenant = Content(**{**content.__dict__, "tenant_id": "tenant-b"})  # a blob moved under another tenant
    with pytest.raises((KeyUnavailable, DecryptionFailed)):
        store.write_plaintext(other_tenant, tmp_path / "out" / "stolen")
    damaged = bytearray(staged.path.read_bytes())
    damaged[len(damaged) // 2] ^= 1
    staged.path.write_bytes(bytes(damaged))
    with pytest.raises(DecryptionFailed):
        store.write_plaintext(content, tmp_path / "out" / "damaged")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy"]  # no partial copy of either
    keys.shred("tenant-a")
    with pytest.raises(KeyUnavailable):
        store.open_content(content)
    with pytest.raises(ContentMissing):
        store.open_content(Content(**{**content.__dict__, "path": tmp_path / "absent"}))
    for bad in ("../x", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            store.open_staging(max_bytes=10, tenant_id=bad)
    writer.discard()
