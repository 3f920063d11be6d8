"""Crypto-shredding is for good (issue 15): whatever a tenant had when its key was shredded stays unreadable after
the same bytes come back under a new key (uploaded again, registered again by a new job, stored again in the
object store), while what is made after the shredding with those bytes reads. The shredding and the new upload
happen within the same second here: nothing is told apart by the clock."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from test_registry_db import make_job, register
from test_sealed_artifacts import FAST_JOB, Platform, canary_dataset

from tuneforge.db import exports as export_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import model_versions as version_rows
from tuneforge.db import sealed_blobs as blob_rows
from tuneforge.db.tables import ShreddedHolder
from tuneforge.registry.exports import register_export
from tuneforge.registry.storage.keys import KeyUnavailable
from tuneforge.registry.versions import ModelShredded, check_readable, file_contents, write_files


@pytest.fixture
def platform(tuneforge_home):
    made = Platform(tuneforge_home, blob_grace_seconds=0)
    yield made
    made.close()


def shredded_response(response, file_id: str) -> bool:
    error = response.json().get("error") or {}
    return (response.status_code == 410 and error.get("code") == "content_shredded"
            and file_id in error.get("message", ""))


def buried(platform: Platform, tenant: str = "tenant-a") -> set[str]:
    with platform.db.read_session() as session:
        return set(session.scalars(ShreddedHolder.__table__.select().with_only_columns(ShreddedHolder.holder)
                                   .where(ShreddedHolder.tenant_id == tenant)))


def test_a_file_from_before_a_shredding_stays_shredded_when_its_bytes_are_uploaded_again(platform, tmp_path):
    from tuneforge.scheduler.executors import build_executor
    from tuneforge.scheduler.worker import Worker

    path, _ = canary_dataset(tmp_path / "train.jsonl")
    plain = path.read_bytes()
    old = platform.upload(path)
    assert platform.validate() == 1
    waiting = platform.upload(path, name="waiting.jsonl")  # the same bytes, not validated before the shredding
    job = platform.http().post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": old,
                                                             "tuneforge": FAST_JOB})
    assert job.status_code == 200, job.text
    theirs = platform.upload(path, tenant="tenant-b")
    platform.tenant_keys().shred("tenant-a")
    assert shredded_response(platform.http().get(f"/v1/files/{old}/content"), old)

    new = platform.upload(path, name="new.jsonl")  # within the same second as the shredding
    assert platform.http().get(f"/v1/files/{new}/content").content == plain
    for file_id in (old, waiting):  # the new blob under the new key never opens for them
        assert shredded_response(platform.http().get(f"/v1/files/{file_id}/content"), file_id)
    assert platform.http("tenant-b").get(f"/v1/files/{theirs}/content").content == plain
    assert buried(platform) == {old, waiting} and buried(platform, "tenant-b") == set()

    assert platform.validate() == 3  # the waiting one fails as shredded; the new one (and tenant-b's) validates
    assert "crypto-shredded" in platform.file(waiting)["status_details"] and platform.file(waiting)["status"] == "error"
    assert platform.file(new)["status"] == "processed"
    worker = Worker(platform.db, platform.settings, build_executor("local", gpus=None, gpu_type=None, cpu_slots=1))
    worker.run_once()
    failed = platform.http().get(f"/v1/fine_tuning/jobs/{job.json()['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "launch_failed", failed
    assert "crypto-shredded" in failed["error"]["message"] and old in failed["error"]["message"]
    assert not (platform.settings.jobs_dir / failed["id"] / "inputs").exists()

    # A second shredding buries the files of the second key too; the first file stays buried, the third reads.
    platform.tenant_keys().shred("tenant-a")
    third = platform.upload(path, name="third.jsonl")
    assert platform.http().get(f"/v1/files/{third}/content").content == plain
    for file_id in (old, waiting, new):
        assert shredded_response(platform.http().get(f"/v1/files/{file_id}/content"), file_id)
    assert buried(platform) == {old, waiting, new}


def test_a_part_from_before_a_shredding_stays_shredded_and_a_new_upload_of_its_bytes_completes(platform, tmp_path):
    path, _ = canary_dataset(tmp_path / "big.jsonl", records=40)
    plain = path.read_bytes()
    http = platform.http()

    def upload_with_one_part() -> tuple[str, str]:
        upload = http.post("/v1/uploads", json={"filename": "big.jsonl", "purpose": "fine-tune", "bytes": len(plain),
                                                "mime_type": "application/jsonl"}).json()
        part = http.post(f"/v1/uploads/{upload['id']}/parts", files={"data": ("part", plain)})
        assert part.status_code == 200, part.text
        return upload["id"], part.json()["id"]

    old_upload, old_part = upload_with_one_part()
    platform.tenant_keys().shred("tenant-a")
    new_upload, new_part = upload_with_one_part()  # the same bytes, sealed under the new key
    sha256 = hashlib.sha256(plain).hexdigest()
    with platform.db.read_session() as session:
        stale = platform.store.find_content(session, tenant_id="tenant-a", sha256=sha256, holder=old_part)
        fresh = platform.store.find_content(session, tenant_id="tenant-a", sha256=sha256, holder=new_part)
        unnamed = platform.store.find_content(session, tenant_id="tenant-a", sha256=sha256)
    assert stale.shredded and not fresh.shredded and unnamed.shredded  # naming no holder never lets one in
    with pytest.raises(KeyUnavailable, match="crypto-shredded"):
        platform.store.open_content(stale)
    with platform.store.open_content(fresh) as handle:
        assert handle.read() == plain
    done = http.post(f"/v1/uploads/{new_upload}/complete", json={"part_ids": [new_part]})
    assert done.status_code == 200, done.text
    assert http.get(f"/v1/files/{done.json()['file']['id']}/content").content == plain
    assert old_part in buried(platform) and new_part not in buried(platform)
    stale_done = http.post(f"/v1/uploads/{old_upload}/complete", json={"part_ids": [old_part]})
    assert stale_done.status_code == 410 and stale_done.json()["error"]["code"] == "content_shredded", stale_done.text


def test_a_version_and_an_export_from_before_a_shredding_stay_shredded_when_a_new_job_registers_their_bytes(
        platform, tmp_path):
    from tuneforge.cli import main

    home, weights = platform.home, b"CANARY adapter weights, the same for both jobs"
    old_job, new_job = make_job(platform.db, tenant="tenant-a")[0], None

    def export_of(job_id: str):
        export_dir = home / "jobs" / job_id / "export"
        export_dir.mkdir(parents=True)
        (export_dir / "serve.json").write_text(json.dumps({"format": "adapter"}))
        (export_dir / "model.safetensors").write_bytes(weights + b" exported")
        with platform.db.session() as session:
            job = job_rows.get_job_any_tenant(session, job_id=job_id)
            export_rows.create_export(session, tenant_id="tenant-a", model_id=model, job_id=job_id)
            register_export(session, platform.store, job=job, job_dir=export_dir.parent)
        shutil.rmtree(export_dir)  # only the registry's copy is read below
        with platform.db.read_session() as session:
            return export_rows.export_of_job(session, job_id=job_id)

    model = register(platform.db, platform.store, home, old_job, weights)
    old_export = export_of(old_job)
    platform.tenant_keys().shred("tenant-a")
    new_job = make_job(platform.db, tenant="tenant-a")[0]
    new_model = register(platform.db, platform.store, home, new_job, weights)  # the same files, under the new key
    new_export = export_of(new_job)

    with platform.db.read_session() as session:
        old_version = version_rows.version_of_model(session, tenant_id="tenant-a", model_id=model)
        new_version = version_rows.version_of_model(session, tenant_id="tenant-a", model_id=new_model)
        assert old_version.manifest == new_version.manifest
        old_files = file_contents(session, platform.store, old_version.manifest, tenant_id="tenant-a", holder=old_job)
        new_files = file_contents(session, platform.store, new_version.manifest, tenant_id="tenant-a", holder=new_job)
        exported = {row["path"]: row["sha256"] for row in export_rows.artifact_files(session, export_id=old_export.id)}
        old_exported = platform.store.find_content(session, tenant_id="tenant-a", holder=old_export.job_id,
                                                   sha256=exported["model.safetensors"])
        new_exported = platform.store.find_content(session, tenant_id="tenant-a", holder=new_export.job_id,
                                                   sha256=exported["model.safetensors"])
    with pytest.raises(ModelShredded, match="crypto-shredded"):
        check_readable(platform.store, old_files)
    with pytest.raises(ModelShredded, match="crypto-shredded"):
        write_files(platform.store, old_version.manifest, tmp_path / "old", contents=old_files)
    assert not list((tmp_path / "old").rglob("*.safetensors"))  # no plaintext written
    check_readable(platform.store, new_files)
    write_files(platform.store, new_version.manifest, tmp_path / "new", contents=new_files)
    assert (tmp_path / "new" / "adapter_model.safetensors").read_bytes() == weights
    with pytest.raises(KeyUnavailable, match="crypto-shredded"):
        platform.store.open_content(old_exported)
    with platform.store.open_content(new_exported) as handle:
        assert handle.read() == weights + b" exported"
    assert {old_job} <= buried(platform) and new_job not in buried(platform)

    # The operator's download goes the same way: v1 (the old job's) refused, v2 written out.
    assert main(["models", "download", "support-bot@v2", "--tenant", "tenant-a", "--out", str(tmp_path / "v2")]) == 0
    assert (tmp_path / "v2" / "adapter_model.safetensors").read_bytes() == weights
    assert main(["models", "download", "support-bot@v1", "--tenant", "tenant-a", "--out", str(tmp_path / "v1")]) != 0
    assert not (tmp_path / "v1").exists()


def test_a_new_version_sharing_files_with_a_shredded_one_materializes_and_the_old_one_does_not(platform, tmp_path):
    """A new model after a shredding shares its config files (not its weights) with an old one: a reader with only
    the version's manifest (materialize_source: continued training, the playground) reads the new one."""
    from test_sealed_registry import version_of

    from tuneforge.registry.models import materialize_source

    old = register(platform.db, platform.store, platform.home, make_job(platform.db, tenant="tenant-a")[0],
                   b"CANARY old weights")
    platform.tenant_keys().shred("tenant-a")
    new = register(platform.db, platform.store, platform.home, make_job(platform.db, tenant="tenant-a")[0],
                   b"CANARY new weights")
    old_version, _, old_source = version_of(platform, "tenant-a", old)
    new_version, _, new_source = version_of(platform, "tenant-a", new)
    shared = {e["sha256"] for e in old_version.manifest["files"]} & {e["sha256"] for e in new_version.manifest["files"]}
    assert len(shared) == 2  # adapter_config.json and tokenizer_config.json: re-sealed under the new key
    adapter = Path(materialize_source(platform.store, new_source, platform.home / "registry", db=platform.db,
                                      private_root=tmp_path / "new"))
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"CANARY new weights"
    with pytest.raises(ModelShredded, match="crypto-shredded"):
        materialize_source(platform.store, old_source, platform.home / "registry", db=platform.db,
                           private_root=tmp_path / "old")
    assert not list((tmp_path / "old").rglob("*.safetensors"))


def test_the_collector_keeps_a_new_blob_while_a_buried_holder_lives_and_drops_the_burials_with_it(platform, tmp_path):
    from tuneforge.scheduler.blobs import BlobCollector

    path, _ = canary_dataset(tmp_path / "train.jsonl")
    old = platform.upload(path)
    platform.tenant_keys().shred("tenant-a")
    new = platform.upload(path, name="new.jsonl")
    collector = BlobCollector(platform.db, platform.settings, platform.store)
    assert platform.http().delete(f"/v1/files/{new}").json()["deleted"]
    time.sleep(1.1)  # past the (zero) grace period, counted in whole seconds
    # The old file still counts: dropping the blob (and its burials) would let a later upload open for it.
    assert collector.run_once()["removed sealed"] == 0 and buried(platform) == {old}
    assert shredded_response(platform.http().get(f"/v1/files/{old}/content"), old)
    assert platform.http().delete(f"/v1/files/{old}").json()["deleted"]
    time.sleep(1.1)
    assert collector.run_once()["removed sealed"] == 1
    assert platform.sealed_files("tenant-a") == [] and buried(platform) == set()  # no burial outlives its bytes
    again = platform.upload(path, name="again.jsonl")
    assert platform.http().get(f"/v1/files/{again}/content").content == path.read_bytes()


def test_rotation_after_a_shredding_leaves_what_was_shredded_alone(platform, tmp_path):
    path, _ = canary_dataset(tmp_path / "train.jsonl")
    old = platform.upload(path)
    other, _ = canary_dataset(tmp_path / "other.jsonl")
    kept = platform.upload(other)  # its blob stays under the shredded key: nothing uploads its bytes again
    platform.tenant_keys().shred("tenant-a")
    new = platform.upload(path, name="new.jsonl")
    version = platform.tenant_keys().rotate("tenant-a")
    assert platform.tenant_keys().keys.versions("tenant-a") == [version]
    assert platform.http().get(f"/v1/files/{new}/content").content == path.read_bytes()
    for file_id in (old, kept):
        assert shredded_response(platform.http().get(f"/v1/files/{file_id}/content"), file_id)
    with platform.db.read_session() as session:
        row = blob_rows.find_blob(session, tenant_id="tenant-a", sha256=hashlib.sha256(other.read_bytes()).hexdigest())
    assert row.key_version < version  # a data key under a destroyed version cannot be re-wrapped: left as it is


def test_an_object_from_before_a_shredding_keeps_its_links_and_stays_shredded_when_stored_again(tmp_path, s3_server):
    from tuneforge.db.migrate import upgrade
    from tuneforge.db.session import Database
    from tuneforge.registry.artifacts import LocalArtifactStore
    from tuneforge.registry.storage.backends import S3Store
    from tuneforge.registry.storage.keys import FolderKeyProvider
    from tuneforge.registry.storage.tenant_store import TenantStore, tenant_address

    db = Database(f"sqlite:///{tmp_path / 'tuneforge.db'}")
    upgrade(db.engine)
    try:
        backend = S3Store(s3_server.new_bucket(), "store", endpoint_url=s3_server.endpoint_url)
        store = TenantStore(db, backend, keys=FolderKeyProvider(tmp_path / "keys"),
                            scratch=LocalArtifactStore(tmp_path / "artifacts"))
        data = tmp_path / "data"
        data.write_bytes(b"CANARY object bytes\n" * 1000)
        old = store.put(tenant_id="tenant-a", path=data, owner="file-old", name="data", kind="dataset")
        outputs = store.put(tenant_id="tenant-a", path=data, owner="ftjob-old", name="adapter/w", kind="adapter")
        assert outputs.id == old.id  # deduplicated within the tenant
        store.shred("tenant-a")
        new = store.put(tenant_id="tenant-a", path=data, owner="file-new", name="data", kind="dataset")
        digest = hashlib.sha256(data.read_bytes()).hexdigest()
        assert new.id != old.id and new.address == tenant_address("tenant-a", digest)
        assert store.fetch(new, tmp_path / "new").read_bytes() == data.read_bytes()
        for owner, name in (("file-old", "data"), ("ftjob-old", "adapter/w")):  # still linked, to the old object
            _, obj = store.linked(tenant_id="tenant-a", owner=owner)[name]
            assert obj.id == old.id and obj.address != new.address
            with pytest.raises(KeyUnavailable):
                store.fetch(obj, tmp_path / "old")
        assert not (tmp_path / "old").exists()
        # Stored once more: the new object, not the set-aside one.
        assert store.put(tenant_id="tenant-a", path=data, owner="file-third", name="data", kind="dataset").id == new.id
    finally:
        db.dispose()


def test_the_burial_holds_on_sqlite_and_postgresql(database_url, tmp_path):
    """The storage layer alone, on both databases: commit, shred, commit the same bytes, read per holder."""
    from tuneforge.db import files as file_rows
    from tuneforge.db import tenants as tenant_rows
    from tuneforge.db.migrate import upgrade
    from tuneforge.db.session import Database
    from tuneforge.registry.artifacts import LocalArtifactStore
    from tuneforge.registry.storage.keys import FolderKeyProvider
    from tuneforge.registry.storage.tenant_keys import TenantKeys

    db = Database(database_url)
    upgrade(db.engine)
    keys = FolderKeyProvider(tmp_path / "keys")
    store = LocalArtifactStore(tmp_path / "artifacts", keys=keys)
    plain = b"CANARY the same bytes twice\n" * 100

    def upload() -> str:
        writer = store.open_staging(max_bytes=1 << 20, tenant_id="tenant-a")
        try:
            writer.write(plain)
            staged = writer.finish()
            with db.session() as session:
                tenant_rows.ensure_tenant(session, tenant_id="tenant-a")
                store.commit(staged, session=session)
                return file_rows.create_file(session, tenant_id="tenant-a", filename="f.jsonl", purpose="fine-tune",
                                             size=staged.size, sha256=staged.sha256, report={}, status="processed",
                                             status_details=None).id
        finally:
            writer.discard()

    def read(file_id: str) -> bytes:
        with db.read_session() as session:
            content = store.find_content(session, tenant_id="tenant-a", sha256=hashlib.sha256(plain).hexdigest(),
                                         holder=file_id)
        with store.open_content(content) as handle:
            return handle.read()

    try:
        old = upload()
        TenantKeys(db, keys).shred("tenant-a")
        new = upload()
        assert read(new) == plain
        with pytest.raises(KeyUnavailable, match="crypto-shredded"):
            read(old)
        third = upload()
        assert read(third) == read(new) == plain
        assert len([p for p in (tmp_path / "artifacts" / "sealed").rglob("*") if p.is_file()]) == 1  # one blob, the new
        with pytest.raises(KeyUnavailable):
            read(old)
    finally:
        db.dispose()
