"""Encryption at rest in the object store (moto's S3 server, one SQLite database for the module; the
schema's PostgreSQL side is the migration test's): stored bytes are
ciphertext, addresses are per tenant, rotation re-wraps data keys without rewriting objects, and
destroying a tenant's key (crypto-shredding) makes its artifacts unreadable while others' stay readable."""

from __future__ import annotations

import os
import secrets
import time

import pytest

from tuneforge.db import keys as key_rows
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.storage.backends import S3Store
from tuneforge.registry.storage.envelope import DecryptionFailed
from tuneforge.registry.storage.keys import FolderKeyProvider, KeyUnavailable
from tuneforge.registry.storage.tenant_store import TenantStore

MiB = 1 << 20


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    db = Database(f"sqlite:///{tmp_path_factory.mktemp('db') / 'tuneforge.db'}")
    upgrade(db.engine)
    yield db
    db.dispose()


@pytest.fixture
def store(tmp_path, database, s3_server) -> TenantStore:
    """A fresh bucket and key folder; tenant ids are fresh per test (the database is the module's)."""
    backend = S3Store(s3_server.new_bucket(), "store", endpoint_url=s3_server.endpoint_url)
    return TenantStore(database, backend, keys=FolderKeyProvider(tmp_path / "keys"),
                       scratch=LocalArtifactStore(tmp_path / "artifacts"))


@pytest.fixture
def tenants() -> tuple[str, str]:
    return f"tenant-a-{secrets.token_hex(3)}", f"tenant-b-{secrets.token_hex(3)}"


def canary_file(path, size: int = 2 * MiB + 123):
    """A file whose distinctive bytes would show in any plaintext copy."""
    marker = b"CANARY-" + secrets.token_hex(8).encode() + b"\n"
    path.write_bytes((marker * (size // len(marker) + 1))[:size])
    return path, marker


def raw_objects(store: TenantStore) -> dict[str, bytes]:
    client = store.backend.client
    return {key: client.get_object(Bucket=store.backend.bucket, Key=f"store/{key}")["Body"].read()
            for key in store.backend.keys()}


def test_stored_bytes_are_ciphertext_and_read_back_whole(store, tmp_path, tenants):
    a, b = tenants
    path, marker = canary_file(tmp_path / "train.jsonl")
    obj = store.put(tenant_id=a, path=path, owner=f"file-1-{a}", name="data", kind="dataset")
    assert obj.encrypted and obj.key_version == 1 and obj.bytes == path.stat().st_size
    stored = raw_objects(store)
    assert list(stored) == [obj.location] and len(stored[obj.location]) > path.stat().st_size
    for blob in stored.values():
        assert marker not in blob and marker[:12] not in blob
    assert marker not in obj.wrapped_key.encode()
    dest = tmp_path / "back.jsonl"
    store.fetch(obj, dest)
    assert dest.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "back.jsonl", "keys", "train.jsonl"]
    assert list((tmp_path / "artifacts" / "staging").iterdir()) == []  # the sealed scratch copy is gone too


def test_addresses_are_per_tenant_and_dedupe_only_within_one(store, tmp_path, tenants):
    a, b = tenants
    path, _ = canary_file(tmp_path / "same.jsonl", 4096)
    a1 = store.put(tenant_id=a, path=path, owner=f"file-a1-{a}", name="data", kind="dataset")
    a2 = store.put(tenant_id=a, path=path, owner=f"file-a2-{a}", name="data", kind="dataset")
    other = store.put(tenant_id=b, path=path, owner=f"file-b-{a}", name="data", kind="dataset")
    assert a1.id == a2.id  # stored once for tenant-a
    assert other.id != a1.id and other.address != a1.address and other.location.split("/")[0] == b
    assert len(raw_objects(store)) == 2
    assert store.linked(tenant_id=b, owner=f"file-a1-{a}") == {}  # another tenant's file: nothing
    assert store.linked(tenant_id=a, owner=f"file-a2-{a}")["data"][1].id == a1.id


def test_rotation_rewraps_data_keys_and_leaves_objects_untouched(store, tmp_path, tenants):
    a, b = tenants
    objects = [store.put(tenant_id=a, path=canary_file(tmp_path / f"f{n}", 1000 + n)[0], owner=f"file-{n}-{a}",
                         name="data", kind="dataset") for n in range(3)]
    before = raw_objects(store)
    assert store.rotate(a) == 2
    with store.db.session() as session:
        rows = [key_rows.find_object(session, tenant_id=a, address=o.address) for o in objects]
        assert key_rows.live_key_versions(session, tenant_id=a) == [2]
    assert all(r.key_version == 2 for r in rows) and all(r.wrapped_key != o.wrapped_key for r, o in zip(rows, objects))
    assert raw_objects(store) == before  # not one object rewritten
    assert store.keys.versions(a) == [2]  # the old version destroyed once nothing needs it
    for n, row in enumerate(rows):
        assert store.fetch(row, tmp_path / f"back{n}").read_bytes() == (tmp_path / f"f{n}").read_bytes()
    fresh = store.put(tenant_id=a, path=canary_file(tmp_path / "new", 10)[0], owner=f"file-new-{a}", name="data",
                      kind="dataset")
    assert fresh.key_version == 2


def test_shredding_a_tenant_key_makes_its_artifacts_unreadable(store, tmp_path, tenants):
    a, b = tenants
    mine = store.put(tenant_id=a, path=canary_file(tmp_path / "a")[0], owner=f"file-a-{a}", name="data", kind="dataset")
    theirs = store.put(tenant_id=b, path=canary_file(tmp_path / "b")[0], owner=f"file-b-{a}", name="data", kind="dataset")
    store.shred(a)
    with pytest.raises(KeyUnavailable):
        store.fetch(mine, tmp_path / "gone")
    assert not any(p.name.startswith("gone") for p in tmp_path.iterdir())  # nothing half-written
    assert store.fetch(theirs, tmp_path / "still").read_bytes() == (tmp_path / "b").read_bytes()
    # A tenant that stores again after shredding gets a new key; the shredded objects stay unreadable.
    again = store.put(tenant_id=a, path=canary_file(tmp_path / "a2", 99)[0], owner=f"file-a2-{a}", name="data",
                      kind="dataset")
    assert store.fetch(again, tmp_path / "a2-back").read_bytes() == (tmp_path / "a2").read_bytes()
    same = store.put(tenant_id=a, path=tmp_path / "a", owner=f"file-a3-{a}", name="data", kind="dataset")
    assert same.id != mine.id  # no dedupe onto shredded ciphertext
    assert store.fetch(same, tmp_path / "a-back").read_bytes() == (tmp_path / "a").read_bytes()
    with pytest.raises(KeyUnavailable):
        store.fetch(mine, tmp_path / "gone")


def test_a_tampered_object_is_refused_and_leaves_nothing(store, tmp_path, tenants):
    a, b = tenants
    path, _ = canary_file(tmp_path / "data", 3 * MiB)
    obj = store.put(tenant_id=a, path=path, owner=f"file-1-{a}", name="data", kind="dataset")
    raw = bytearray(raw_objects(store)[obj.location])
    raw[len(raw) // 2] ^= 0x40
    (tmp_path / "tampered").write_bytes(bytes(raw))
    store.backend.put_file(obj.location, tmp_path / "tampered")
    with pytest.raises(DecryptionFailed):
        store.fetch(obj, tmp_path / "out")
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out")]


def test_job_inputs_staged_decrypted_then_removed_and_outputs_published(store, tmp_path, tenants):
    """What the worker does around a recipe (registry/storage/jobs.py), on both sides of two machines."""
    from tuneforge.registry.storage.jobs import (
        StoreUnavailable,
        fetch_outputs,
        publish_outputs,
        remove_inputs,
        stage_inputs,
    )

    from tuneforge.registry.artifacts import Content

    a, _ = tenants
    blob, marker = canary_file(tmp_path / "blob", 5000)
    local = Content(tenant_id=a, sha256="0" * 64, path=blob)  # a plaintext blob of this machine's artifact folder
    file_id = f"file-{a}"
    job_dir = tmp_path / "jobs" / "ftjob-1"
    staged = stage_inputs(store, store.scratch, tenant_id=a, contents={file_id: local}, job_dir=job_dir)  # publishes first
    assert staged == {file_id: job_dir / "inputs" / file_id} and staged[file_id].read_bytes() == blob.read_bytes()
    assert oct((job_dir / "inputs").stat().st_mode & 0o777) == "0o700"
    assert not any(marker in raw for raw in raw_objects(store).values())
    remove_inputs(job_dir)
    assert not (job_dir / "inputs").exists()

    elsewhere = tmp_path / "other-machine" / "ftjob-1"  # no local blob: from the store only
    staged = stage_inputs(store, store.scratch, tenant_id=a, contents={file_id: None}, job_dir=elsewhere)
    assert staged[file_id].read_bytes() == blob.read_bytes()
    assert sorted(p.name for p in (elsewhere / "inputs").iterdir()) == [file_id]  # no .sealed / .partial left
    (elsewhere / "adapter").mkdir()
    (elsewhere / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(3000))
    (elsewhere / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (elsewhere / "evaluation.json").write_text('{"metrics": {}}')
    (elsewhere / "checkpoints" / "step-2").mkdir(parents=True)
    (elsewhere / "checkpoints" / "step-2" / "state.bin").write_bytes(b"resume state")
    published = publish_outputs(store, tenant_id=a, job_id="ftjob-1", job_dir=elsewhere)
    assert sorted(published) == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "evaluation.json"]
    kinds = {name: kind for name, (kind, _) in store.linked(tenant_id=a, owner="ftjob-1").items()}
    assert kinds == {"adapter/adapter_config.json": "adapter", "adapter/adapter_model.safetensors": "adapter",
                     "evaluation.json": "evaluation"}
    assert fetch_outputs(store, tenant_id=a, job_id="ftjob-1", dest=tmp_path / "fetched") == sorted(published)
    for name in published:
        assert (tmp_path / "fetched" / name).read_bytes() == (elsewhere / name).read_bytes()
    assert fetch_outputs(store, tenant_id=tenants[1], job_id="ftjob-1", dest=tmp_path / "b") == []  # not theirs

    store.shred(a)
    with pytest.raises(StoreUnavailable, match="tenant key is gone"):
        stage_inputs(store, store.scratch, tenant_id=a, contents={file_id: local}, job_dir=tmp_path / "jobs" / "ftjob-2")
    assert not (tmp_path / "jobs" / "ftjob-2" / "inputs").exists()  # nothing half-staged


def test_the_collector_removes_inputs_a_dead_worker_left(database, tmp_path):
    """A worker killed before it could remove a job's decrypted inputs: the collector removes them once
    the job is not running and nothing has written the folder for a minute; a fresh one stays."""
    import time

    from tuneforge.scheduler.blobs import BlobCollector
    from tuneforge.settings import Settings

    settings = Settings.from_env(database_url=str(database.engine.url), artifacts_dir=tmp_path / "artifacts",
                                 jobs_dir=tmp_path / "jobs")
    left, staging = tmp_path / "jobs" / "ftjob-dead" / "inputs", tmp_path / "jobs" / "ftjob-new" / "inputs"
    for folder in (left, staging):
        folder.mkdir(parents=True)
        (folder / "file-1").write_text("decrypted rows")
    old = time.time() - 120
    os.utime(left, (old, old))
    assert BlobCollector(database, settings, LocalArtifactStore(settings.artifacts_dir)).run_once()["stale job inputs"] == 1
    assert not left.exists() and (left.parent).is_dir() and (staging / "file-1").is_file()


def test_the_collector_removes_objects_nothing_links_to_any_more(store, database, tmp_path, tenants, s3_server):
    """The object store's collector: a deleted file's dataset object goes once no job that may still run
    names the file; a deleted model's published outputs go; a live file's object, one a paused job needs,
    and a dataset registered in the tenant's own bucket (only forgotten) stay."""
    from tuneforge.db import files as file_rows
    from tuneforge.db import jobs as job_rows
    from tuneforge.db import models as model_rows
    from sqlalchemy import select

    from tuneforge.db import tenants as tenant_rows
    from tuneforge.db.identifiers import new_id
    from tuneforge.db.tables import FineTunedModel
    from tuneforge.registry.storage.jobs import publish_outputs
    from tuneforge.scheduler.blobs import BlobCollector
    from tuneforge.settings import Settings
    from tuneforge.spec import validate_job_spec

    a, _ = tenants
    with database.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id=a)
        files = {name: file_rows.create_file(session, tenant_id=a, filename=f"{name}.jsonl", purpose="fine-tune",
                                             size=1, sha256="0" * 64, report={}, status="processed",
                                             status_details=None).id for name in ("live", "deleted", "paused")}
        paused = job_rows.create_job(session, tenant_id=a, spec=validate_job_spec({"dataset": {"path": files["paused"]}}),
                                     model="tiny-llama", training_file=files["paused"], validation_file=None,
                                     suffix=None, metadata=None)
        paused.status = "paused"
        done = job_rows.create_job(session, tenant_id=a, spec=validate_job_spec({"dataset": {"path": files["live"]}}),
                                   model="tiny-llama", training_file=files["live"], validation_file=None, suffix=None,
                                   metadata=None)
        done.status = "succeeded"
        model_id = model_rows.create_model(session, model_id=f"ft:tiny-llama:{a}:{new_id('')[:8]}", tenant_id=a,
                                           job_id=done.id, base_model="tiny-llama", kind="adapter",
                                           location="jobs/x/adapter").id
        job_ids = paused.id, done.id
    objects = {name: store.put(tenant_id=a, path=canary_file(tmp_path / name, 100 + n)[0], owner=files[name],
                               name="data", kind="dataset") for n, name in enumerate(files)}
    output = tmp_path / "job"
    (output / "adapter").mkdir(parents=True)
    (output / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(500))
    publish_outputs(store, tenant_id=a, job_id=job_ids[1], job_dir=output)
    registered_bucket = s3_server.new_bucket()
    s3_server.client().put_object(Bucket=registered_bucket, Key="own/train.jsonl", Body=b"{}\n")
    with database.session() as session:
        registered = file_rows.create_file(session, tenant_id=a, filename="train.jsonl", purpose="fine-tune", size=3,
                                           sha256="1" * 64, report={}, status="processed", status_details=None)
        obj = key_rows.add_object(session, object_id=new_id(key_rows.OBJECT), tenant_id=a, address="f" * 64,
                                  location=f"s3://{registered_bucket}/own/train.jsonl", size=3, encrypted=False,
                                  key_version=None, wrapped_key=None)
        key_rows.link_object(session, owner=registered.id, name="data", tenant_id=a, kind="dataset", object_id=obj.id)
        for name in ("deleted", "paused"):
            file_rows.delete_file(session, file=file_rows.get_file(session, tenant_id=a, file_id=files[name]))
        file_rows.delete_file(session, file=registered)
        model_rows.delete_model(session, model=session.scalar(select(FineTunedModel).where(FineTunedModel.id == model_id)))
    before = set(raw_objects(store))
    assert len(before) == 4

    settings = Settings.from_env(database_url=str(database.engine.url), artifacts_dir=tmp_path / "artifacts",
                                 jobs_dir=tmp_path / "jobs", blob_grace_seconds=0, keys_dir=str(tmp_path / "keys"),
                                 store_url=f"s3://{store.backend.bucket}/store", s3_endpoint_url=s3_server.endpoint_url)
    collector = BlobCollector(database, settings, LocalArtifactStore(tmp_path / "artifacts"))
    time.sleep(1.1)  # past the (zero) grace period, counted in whole seconds
    counts = collector.run_once()
    assert counts["store objects removed"] == 2  # the deleted file's dataset, the deleted model's adapter
    assert set(raw_objects(store)) == {objects["live"].location, objects["paused"].location}
    assert store.linked(tenant_id=a, owner=job_ids[1]) == {} and store.linked(tenant_id=a, owner=registered.id) == {}
    assert "Contents" in s3_server.client().list_objects_v2(Bucket=registered_bucket)  # the tenant's own bucket: untouched
    assert collector.run_once()["store objects removed"] == 0
