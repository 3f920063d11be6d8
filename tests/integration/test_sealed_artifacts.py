"""The artifact folder sealed at rest (the embedded default: SQLite and a local folder, no object store):
uploads are stored as envelope ciphertext under a data key of their own, per tenant; validation, content
downloads, the Uploads API and job launch read them decrypted; rotation re-wraps them, shredding makes
them unreadable (410, a job failing at launch); plaintext blobs of an install from before sealing keep
working and are sealed by `tuneforge storage seal-artifacts`; the collector removes what nothing refers
to. Each app runs in this process (TestClient), with the validator and the worker driven one pass at a
time. The last test trains a tiny model through a real server on a canary upload and greps the whole
TUNEFORGE_HOME for it afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from pathlib import Path

import pytest
from conftest import ServerProcess, chat, post_file, wait_validated, write_jsonl
from fastapi.testclient import TestClient

from tuneforge.db import files as file_rows
from tuneforge.db import sealed_blobs as blob_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.storage.keys import FolderKeyProvider
from tuneforge.registry.storage.tenant_keys import TenantKeys
from tuneforge.settings import Settings

FAST_JOB = {"training": {"max_steps": 2, "per_device_batch_size": 2}, "dataset": {"max_seq_length": 256},
            "evaluation": {"max_eval_examples": 2, "eval_before_training": False}, "checkpoint": {"every_steps": 2}}


def canary_dataset(path: Path, records: int = 24) -> tuple[Path, bytes]:
    """A valid chat dataset whose every answer carries one random marker."""
    marker = f"CANARY{secrets.token_hex(8)}"
    write_jsonl(path, [chat(f"question {n}?", f"{marker} answer {n}") for n in range(records)])
    return path, marker.encode()


def files_containing(root: Path, needle: bytes) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                if needle in handle.read():
                    found.append(path)
    return found


class Platform:
    """An API app, its upload validator and a worker, in this process, on one SQLite home."""

    def __init__(self, home: Path, **settings):
        self.home = home
        self.settings = Settings.from_env(database_url=f"sqlite:///{home / 'tuneforge.db'}", **settings)
        self.db = Database(self.settings.database_url)
        upgrade(self.db.engine)
        from tuneforge.api.app import create_app

        self.app = create_app(self.settings, db=self.db)
        self.store: LocalArtifactStore = self.app.state.store
        self.keys = {}
        with self.db.session() as session:
            for tenant in ("tenant-a", "tenant-b"):
                _, self.keys[tenant] = tenant_rows.create_api_key(session, tenant_id=tenant)
        self.client = TestClient(self.app)

    def http(self, tenant: str = "tenant-a") -> TestClient:
        self.client.headers["Authorization"] = f"Bearer {self.keys[tenant]}"
        return self.client

    def upload(self, path: Path, tenant: str = "tenant-a", name: str | None = None) -> str:
        with open(path, "rb") as handle:
            response = self.http(tenant).post("/v1/files", data={"purpose": "fine-tune"},
                                              files={"file": (name or path.name, handle)})
        assert response.status_code == 200, response.text
        return response.json()["id"]

    def validate(self) -> int:
        from tuneforge.scheduler.upload_validation import UploadValidator

        return UploadValidator(self.db, self.settings, LocalArtifactStore.from_settings(self.settings)).run_once()

    def file(self, file_id: str, tenant: str = "tenant-a") -> dict:
        return self.http(tenant).get(f"/v1/files/{file_id}").json()

    def tenant_keys(self) -> TenantKeys:
        return TenantKeys(self.db, FolderKeyProvider(Path(self.settings.keys_dir)))

    def sealed_files(self, tenant: str) -> list[Path]:
        return sorted(p for p in (self.settings.artifacts_dir / "sealed" / tenant).rglob("*") if p.is_file())

    def close(self) -> None:
        self.client.close()
        self.db.dispose()


@pytest.fixture
def platform(tmp_path, tuneforge_home):
    made = Platform(tuneforge_home)
    yield made
    made.close()


def test_uploads_are_stored_sealed_per_tenant_and_read_back_decrypted(platform, tmp_path):
    path, marker = canary_dataset(tmp_path / "train.jsonl")
    plain = path.read_bytes()
    mine = platform.upload(path)
    assert platform.validate() == 1 and platform.file(mine)["status"] == "processed"  # validated decrypted
    artifacts = platform.settings.artifacts_dir
    assert files_containing(artifacts, marker) == [] and files_containing(platform.home / "keys", marker) == []
    assert not (artifacts / "sha256").exists()  # no plaintext blob at all
    assert list((artifacts / "staging").iterdir()) == []  # the validation's decrypted copy is gone
    [blob] = platform.sealed_files("tenant-a")
    assert blob.read_bytes()[:4] == b"TFE1" and blob.stat().st_size == len(plain) + 16 + 16  # one chunk

    response = platform.http().get(f"/v1/files/{mine}/content")
    assert response.status_code == 200 and response.content == plain
    assert response.headers["content-length"] == str(len(plain))
    assert response.headers["content-disposition"] == 'attachment; filename="train.jsonl"'

    # The same bytes again: stored once for tenant-a; tenant-b's copy is its own (another key, other bytes).
    again = platform.upload(path, name="again.jsonl")
    theirs = platform.upload(path, tenant="tenant-b")
    assert platform.sealed_files("tenant-a") == [blob]
    [other] = platform.sealed_files("tenant-b")
    assert other.read_bytes() != blob.read_bytes() and other.name != blob.name
    assert platform.http().get(f"/v1/files/{again}/content").content == plain
    assert platform.http("tenant-b").get(f"/v1/files/{theirs}/content").content == plain
    assert platform.http("tenant-b").get(f"/v1/files/{mine}/content").status_code == 404  # not theirs


def test_a_multipart_upload_is_sealed_part_by_part_and_assembled_decrypted(platform, tmp_path):
    path, marker = canary_dataset(tmp_path / "big.jsonl", records=400)
    plain = path.read_bytes()
    http = platform.http()
    upload = http.post("/v1/uploads", json={"filename": "big.jsonl", "purpose": "fine-tune", "bytes": len(plain),
                                            "mime_type": "application/jsonl"}).json()
    half = len(plain) // 2
    parts = [http.post(f"/v1/uploads/{upload['id']}/parts", files={"data": ("part", chunk)}).json()["id"]
             for chunk in (plain[:half], plain[half:])]
    assert files_containing(platform.settings.artifacts_dir, marker) == []  # the parts are sealed too
    done = http.post(f"/v1/uploads/{upload['id']}/complete", json={"part_ids": parts,
                                                                    "md5": hashlib.md5(plain).hexdigest()})
    assert done.status_code == 200, done.text
    file_id = done.json()["file"]["id"]
    assert files_containing(platform.settings.artifacts_dir, marker) == []
    assert http.get(f"/v1/files/{file_id}/content").content == plain
    assert len(platform.sealed_files("tenant-a")) == 3  # two parts (the collector's, once the grace passes) and the file


def test_rotation_rewraps_sealed_uploads_and_shredding_makes_them_unreadable(platform, tmp_path):
    from tuneforge.scheduler.executors import build_executor
    from tuneforge.scheduler.worker import Worker

    path, _ = canary_dataset(tmp_path / "train.jsonl")
    mine, theirs = platform.upload(path), platform.upload(path, tenant="tenant-b")
    assert platform.validate() == 2
    [blob] = platform.sealed_files("tenant-a")
    before = blob.read_bytes()
    keys = platform.tenant_keys()
    assert keys.rotate("tenant-a") == 2
    with platform.db.read_session() as session:
        row = blob_rows.find_blob(session, tenant_id="tenant-a", sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    assert row.key_version == 2 and blob.read_bytes() == before  # the row re-wrapped, the blob not rewritten
    assert keys.keys.versions("tenant-a") == [2]
    assert platform.http().get(f"/v1/files/{mine}/content").content == path.read_bytes()

    waiting = platform.upload(canary_dataset(tmp_path / "later.jsonl")[0])  # not validated before the shredding
    job = platform.http().post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": mine,
                                                             "tuneforge": FAST_JOB})
    assert job.status_code == 200, job.text
    keys.shred("tenant-a")

    gone = platform.http().get(f"/v1/files/{mine}/content")
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "content_shredded"
    assert "crypto-shredded" in gone.json()["error"]["message"] and "/" not in gone.json()["error"]["message"]
    assert platform.http("tenant-b").get(f"/v1/files/{theirs}/content").content == path.read_bytes()

    assert platform.validate() == 1
    refused = platform.file(waiting)
    assert refused["status"] == "error" and "crypto-shredded" in refused["status_details"]

    worker = Worker(platform.db, platform.settings, build_executor("local", gpus=None, gpu_type=None, cpu_slots=1))
    worker.run_once()
    failed = platform.http().get(f"/v1/fine_tuning/jobs/{job.json()['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "launch_failed"
    assert "crypto-shredded" in failed["error"]["message"] and mine in failed["error"]["message"]
    assert not (platform.settings.jobs_dir / failed["id"] / "inputs").exists()  # nothing half-staged

    # Stored again after the shredding: a new key, and no dedupe onto the unreadable blob.
    fresh = platform.upload(path, name="fresh.jsonl")
    assert platform.http().get(f"/v1/files/{fresh}/content").content == path.read_bytes()
    assert platform.tenant_keys().keys.versions("tenant-a") == [3]


def test_plaintext_blobs_of_an_upgraded_install_keep_working_and_are_sealed_on_request(platform, tmp_path):
    """An upload stored before sealing (artifacts/sha256/, no sealed row) downloads, validates and stages as
    before; `tuneforge storage seal-artifacts` seals every tenant's copy and removes the plaintext."""
    from tuneforge.registry.storage.jobs import stage_inputs
    from tuneforge.registry.storage.reseal import seal_plaintext_uploads

    path, marker = canary_dataset(tmp_path / "old.jsonl")
    legacy = LocalArtifactStore(platform.settings.artifacts_dir)  # an install from before sealing
    with open(path, "rb") as handle, legacy.staging(handle, filename="old.jsonl", max_bytes=1 << 20) as staged:
        legacy.commit(staged)
    with platform.db.session() as session:
        ids = [file_rows.create_file(session, tenant_id=tenant, filename="old.jsonl", purpose="fine-tune",
                                     size=staged.size, sha256=staged.sha256, report={}, status="uploaded",
                                     status_details=None).id for tenant in ("tenant-a", "tenant-b")]
    assert platform.validate() == 2 and platform.file(ids[0])["status"] == "processed"
    assert platform.http().get(f"/v1/files/{ids[0]}/content").content == path.read_bytes()
    with platform.db.read_session() as session:
        content = platform.store.find_content(session, tenant_id="tenant-a", sha256=staged.sha256)
    assert not content.sealed
    job_dir = tmp_path / "job"
    staged_inputs = stage_inputs(None, platform.store, tenant_id="tenant-a", contents={ids[0]: content}, job_dir=job_dir)
    assert staged_inputs[ids[0]] == legacy.path_of(staged.sha256)  # read where it is: it is plaintext already

    report = seal_plaintext_uploads(platform.db, platform.store)
    assert (report.sealed, report.plaintext_removed, report.missing) == (2, 1, 0)
    assert not legacy.exists(staged.sha256) and files_containing(platform.settings.artifacts_dir, marker) == []
    for tenant, file_id in zip(("tenant-a", "tenant-b"), ids):
        assert len(platform.sealed_files(tenant)) == 1
        assert platform.http(tenant).get(f"/v1/files/{file_id}/content").content == path.read_bytes()
    assert seal_plaintext_uploads(platform.db, platform.store).sealed == 0  # nothing left to do


def test_the_collector_removes_sealed_blobs_nothing_of_their_tenant_refers_to(tmp_path, tuneforge_home):
    from tuneforge.scheduler.blobs import ORPHAN_MIN_AGE_S, BlobCollector

    platform = Platform(tuneforge_home, blob_grace_seconds=0)
    try:
        path, _ = canary_dataset(tmp_path / "train.jsonl")
        mine, theirs = platform.upload(path), platform.upload(path, tenant="tenant-b")
        [blob] = platform.sealed_files("tenant-a")
        orphan = blob.parent / "blob_0000000000000000000000ff"  # a process died before committing its row
        orphan.write_bytes(b"TFE1 ciphertext")
        collector = BlobCollector(platform.db, platform.settings, platform.store)
        time.sleep(1.1)  # past the (zero) grace period, counted in whole seconds
        counts = collector.run_once()
        assert counts["removed sealed"] == 0 and counts["sealed orphans"] == 0  # referenced; the orphan is young
        assert platform.http().delete(f"/v1/files/{mine}").json()["deleted"]
        time.sleep(1.1)
        old = time.time() - ORPHAN_MIN_AGE_S - 1
        os.utime(orphan, (old, old))
        counts = collector.run_once()
        assert counts["removed sealed"] == 1 and counts["sealed orphans"] == 1
        assert platform.sealed_files("tenant-a") == [] and len(platform.sealed_files("tenant-b")) == 1  # B's stays
        assert platform.http("tenant-b").get(f"/v1/files/{theirs}/content").status_code == 200
    finally:
        platform.close()


def test_a_job_trains_on_a_sealed_upload_and_leaves_no_plaintext_behind(tmp_path, monkeypatch):
    """A real server and worker: the recipe reads the upload decrypted in DIR/inputs; once the job has
    succeeded, no file under TUNEFORGE_HOME holds the canary, and no tokenized copy of it is left. Its
    checkpoints, adapter and evaluation report are sealed in the job directory, and the API reads the report."""
    home = tmp_path / "home"
    home.mkdir()
    path, marker = canary_dataset(tmp_path / "train.jsonl")
    monkeypatch.setenv("TUNEFORGE_ENCRYPT_AT_REST", "true")
    server = ServerProcess(home, f"sqlite:///{home / 'tuneforge.db'}")
    try:
        import httpx

        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['tenant-a']}"},
                            timeout=30)
        file = wait_validated(http, post_file(http, path)["id"])
        assert file["status"] == "processed", file
        job = http.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": file["id"],
                                                      "tuneforge": FAST_JOB}).json()
        deadline = time.monotonic() + 300
        while (done := http.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"] not in (
                "succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.5)
        assert done["status"] == "succeeded", done["error"]
        assert http.get(f"/v1/files/{file['id']}/content").content == path.read_bytes()
        job_dir = home / "jobs" / job["id"]
        report = http.get(f"/v1/fine_tuning/jobs/{job['id']}/evaluation")
        assert report.status_code == 200 and report.json()["fine_tuned_model"] == done["fine_tuned_model"], report.text
    finally:
        server.stop()
    assert (job_dir / "adapter").is_dir() and not (job_dir / "inputs").exists()
    outputs = [p for part in ("adapter", "checkpoints", "evaluation.json") for p in
               ((job_dir / part).rglob("*") if (job_dir / part).is_dir() else [job_dir / (part + ".tfe")]) if p.is_file()]
    assert any("checkpoints" in p.parts for p in outputs) and (job_dir / "evaluation.json.tfe").is_file()
    assert all(p.name.endswith(".tfe") and p.read_bytes()[:4] == b"TFE1" for p in outputs), outputs
    assert files_containing(job_dir, b'","shape":[') == []  # no safetensors header left readable in the job directory
    assert files_containing(home, marker) == []
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cache = home / "cache" / "tokenized"
    assert list(cache.glob(".*.lock"))  # the recipe did tokenize into the cache (its entry's build lock stays)
    tokenized = [json.loads(m.read_text()) for m in cache.glob("*/meta.json")]
    assert [t for t in tokenized if t.get("dataset_sha256") == digest] == []


def test_a_tokenized_copy_is_kept_while_an_unfinished_job_or_a_running_sweep_reads_its_bytes(tmp_path):
    # Removing it after every job would make each sweep trial, and each resume, tokenize the file again.
    from tuneforge.db import jobs as job_rows
    from tuneforge.db import sweeps as sweep_rows
    from tuneforge.scheduler import states
    from tuneforge.spec import validate_job_spec

    db = Database(f"sqlite:///{tmp_path / 'tuneforge.db'}")
    upgrade(db.engine)
    digest = "ab" * 32
    with db.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id="acme")
        file = file_rows.create_file(session, tenant_id="acme", filename="train.jsonl", purpose="fine-tune", size=1,
                                     sha256=digest, report={}, status="processed", status_details=None)
        spec = validate_job_spec({"dataset": {"path": file.id}})
        job = job_rows.create_job(session, tenant_id="acme", spec=spec, model="tiny-llama", training_file=file.id,
                                  validation_file=None, suffix=None, metadata=None)
        job_id = job.id
    with db.session() as session:
        assert blob_rows.tokenized_copy_needed(session, sha256=digest)  # the job is still to run (or resume)
        assert states.cancel(session, job_id=job_id)
    with db.session() as session:
        assert not blob_rows.tokenized_copy_needed(session, sha256=digest)
        sweep = sweep_rows.create_sweep(session, tenant_id="acme", name="s", spec={"base": {"dataset": {"path": file.id}}})
    with db.session() as session:
        assert blob_rows.tokenized_copy_needed(session, sha256=digest)  # its next trials train on it
        assert not blob_rows.tokenized_copy_needed(session, sha256="cd" * 32)
        session.get(type(sweep), sweep.seq).status = "succeeded"
    with db.session() as session:
        assert not blob_rows.tokenized_copy_needed(session, sha256=digest)
    db.dispose()
