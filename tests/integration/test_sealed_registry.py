"""The model registry's files sealed at rest (no object store): a version's files and an export's are sealed blobs
of their tenant (ciphertext on disk, one blob per tenant and content, never shared); readers decrypt them where they
are used (a job's inputs, a playground process's own folder, `tuneforge models download`), never into the shared
TUNEFORGE_HOME/registry cache; rotation re-wraps them, the collector keeps them while their version lives, a
shredded tenant's version is refused by the playground (410) and fails a job at launch; `seal-artifacts` seals the
plaintext registry of an upgraded install and removes its materialized copies; a worker decrypts the version a job
continues into the job's inputs and removes it with them; the playground decrypts one only into its child's folder.
The last test (slow) continues training a sealed version to success with a real worker and asks the playground for
it, then finds no plaintext of it left."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import time
from pathlib import Path

import pytest
from test_registry_db import make_job, register
from test_sealed_artifacts import FAST_JOB, Platform, canary_dataset, files_containing

from tuneforge.db import exports as export_rows
from tuneforge.db import files as file_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import model_versions as version_rows
from tuneforge.db import models as model_rows
from tuneforge.db import sealed_blobs as blob_rows
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.exports import export_artifact, register_export
from tuneforge.registry.models import delete_model_and_version, materialize_source, model_source, register_job_output
from tuneforge.registry.versions import ModelShredded, verify_directory
from tuneforge.scheduler import states
from tuneforge.spec.jobdir import ENVIRONMENT_FILE, read_spec

ASK = [{"role": "user", "content": "Say hi."}]


@pytest.fixture
def platform(tuneforge_home):
    made = Platform(tuneforge_home, blob_grace_seconds=0)
    yield made
    made.close()


def marker() -> bytes:
    return f"CANARY{secrets.token_hex(8)}".encode()


def version_of(platform: Platform, tenant: str, model_id: str):
    with platform.db.read_session() as session:
        version = version_rows.version_of_model(session, tenant_id=tenant, model_id=model_id)
        rows = {entry["sha256"]: blob_rows.find_blob(session, tenant_id=tenant, sha256=entry["sha256"])
                for entry in version.manifest["files"]}
        return version, rows, model_source(session, tenant_id=tenant, base_model=model_id, home=platform.home)


def sha256_files(root: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def test_a_versions_files_are_sealed_for_its_tenant_and_decrypted_only_where_used(platform, tmp_path):
    from tuneforge.cli import main
    from tuneforge.scheduler.blobs import BlobCollector

    home, artifacts, weights = platform.home, platform.settings.artifacts_dir, marker() + b" adapter weights"
    mine, theirs = (register(platform.db, platform.store, home, make_job(platform.db, tenant=t)[0], weights)
                    for t in ("tenant-a", "tenant-b"))
    version, rows, source = version_of(platform, "tenant-a", mine)
    their_version, their_rows, _ = version_of(platform, "tenant-b", theirs)
    assert version.manifest == their_version.manifest and all(rows.values()) and all(their_rows.values())
    # Ciphertext only, one blob per tenant and content: the other tenant's copy is its own blob under its own key.
    assert files_containing(artifacts, weights[:22]) == [] and not list((artifacts / "sha256").rglob("*"))
    assert {r.id for r in rows.values()}.isdisjoint(r.id for r in their_rows.values())
    assert len(platform.sealed_files("tenant-a")) == len(platform.sealed_files("tenant-b")) == 3
    assert all(p.read_bytes()[:4] == b"TFE1" for p in platform.sealed_files("tenant-a"))

    # A job's reader: decrypted into its own inputs, never the shared cache; the operator's download: decrypted.
    private = tmp_path / "job" / "inputs" / "models"
    adapter = Path(materialize_source(platform.store, source, home / "registry", db=platform.db, private_root=private))
    assert adapter.parent == private and verify_directory(source.manifest, adapter) == []
    assert (adapter / "adapter_model.safetensors").read_bytes() == weights and not (home / "registry").exists()
    out = tmp_path / "download"
    assert main(["models", "download", "support-bot@v1", "--tenant", "tenant-a", "--out", str(out)]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() == weights

    # An export of the version: its files and lineage sealed too, the lineage read back decrypted.
    export_job, _ = make_job(platform.db, tenant="tenant-a")
    export_dir = home / "jobs" / export_job / "export"
    export_dir.mkdir(parents=True)
    (export_dir / "serve.json").write_text(json.dumps({"format": "adapter"}))
    (export_dir / "model.safetensors").write_bytes(weights + b" exported")
    with platform.db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=export_job)
        export_rows.create_export(session, tenant_id="tenant-a", model_id=mine, job_id=export_job)
        lineage = register_export(session, platform.store, job=job, job_dir=export_dir.parent)
    shutil.rmtree(export_dir)  # the worker seals the job directory; here only the registry's copy is looked at
    with platform.db.read_session() as session:
        export = export_rows.export_of_job(session, job_id=export_job)
        assert export_artifact(session, platform.store, export=export)["lineage"] == lineage
    assert files_containing(artifacts, weights[:22]) == [] and len(platform.sealed_files("tenant-a")) == 3 + 3

    # Rotation re-wraps the rows (no blob rewritten); the version still opens.
    before = {p: p.read_bytes() for p in platform.sealed_files("tenant-a")}
    assert platform.tenant_keys().rotate("tenant-a") == 2
    _, rows, source = version_of(platform, "tenant-a", mine)
    assert {r.key_version for r in rows.values()} == {2} and {p: p.read_bytes() for p in before} == before
    again = materialize_source(platform.store, source, home / "registry", db=platform.db, private_root=tmp_path / "j2")
    assert verify_directory(source.manifest, Path(again)) == []

    # The collector keeps a live version's blobs; once it is deleted they go, the other tenant's stay.
    collector = BlobCollector(platform.db, platform.settings, platform.store)
    time.sleep(1.1)  # past the (zero) grace period, counted in whole seconds
    assert collector.run_once()["removed sealed"] == 0
    with platform.db.session() as session:
        delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="tenant-a", model_id=mine))
    time.sleep(1.1)
    assert collector.run_once()["removed sealed"] == 3  # the export's own files and lineage stay with the export
    assert len(platform.sealed_files("tenant-a")) == 3 and len(platform.sealed_files("tenant-b")) == 3


def test_a_shredded_tenants_version_is_refused_by_the_playground_and_fails_a_job_at_launch(platform, tmp_path):
    from tuneforge.scheduler.executors import build_executor
    from tuneforge.scheduler.worker import Worker

    model = register(platform.db, platform.store, platform.home, make_job(platform.db, tenant="tenant-a")[0],
                     marker())
    # The training data stays readable after the shredding (a plaintext blob of an install from before sealing), so
    # the job's launch fails on the model.
    path, _ = canary_dataset(tmp_path / "train.jsonl")
    legacy = LocalArtifactStore(platform.settings.artifacts_dir)
    with open(path, "rb") as handle, legacy.staging(handle, filename="train.jsonl", max_bytes=1 << 20) as staged:
        legacy.commit(staged)
    with platform.db.session() as session:
        file_id = file_rows.create_file(session, tenant_id="tenant-a", filename="train.jsonl", purpose="fine-tune",
                                        size=staged.size, sha256=staged.sha256, report={}, status="uploaded",
                                        status_details=None).id
    assert platform.validate() >= 1
    job = platform.http().post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id,
                                                             "tuneforge": FAST_JOB})
    assert job.status_code == 200, job.text
    platform.tenant_keys().shred("tenant-a")

    _, _, source = version_of(platform, "tenant-a", model)
    with pytest.raises(ModelShredded, match="crypto-shredded"):
        materialize_source(platform.store, source, platform.home / "registry", db=platform.db,
                           private_root=tmp_path / "models")
    assert not list((tmp_path / "models").rglob("*.safetensors"))  # no partial copy
    refused = platform.http().post("/v1/chat/completions", json={"model": model, "messages": ASK})
    assert refused.status_code == 410 and refused.json()["error"]["code"] == "content_shredded", refused.text
    assert "crypto-shredded" in refused.json()["error"]["message"] and "/" not in refused.json()["error"]["message"]
    assert not (platform.home / "run").exists() or not list((platform.home / "run").iterdir())  # no process started

    worker = Worker(platform.db, platform.settings, build_executor("local", gpus=None, gpu_type=None, cpu_slots=1))
    for _ in range(3):  # the make_job job (no data) fails first, or this one does
        worker.run_once()
    failed = platform.http().get(f"/v1/fine_tuning/jobs/{job.json()['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "launch_failed", failed
    assert "crypto-shredded" in failed["error"]["message"]
    assert not (platform.settings.jobs_dir / failed["id"] / "inputs").exists()  # nothing decrypted left


def test_seal_artifacts_seals_an_upgraded_registry_and_removes_its_plaintext_copies(platform, tmp_path):
    from tuneforge.registry.storage.reseal import seal_plaintext_uploads

    home, artifacts, weights = platform.home, platform.settings.artifacts_dir, marker() + b" old weights"
    legacy = LocalArtifactStore(artifacts)  # an install from before sealing: plaintext blobs, a shared cache
    model = register(platform.db, legacy, home, make_job(platform.db, tenant="tenant-a")[0], weights)
    _, rows, source = version_of(platform, "tenant-a", model)
    assert not any(rows.values())
    cached = Path(materialize_source(legacy, source, home / "registry"))
    assert files_containing(artifacts, weights) and (cached / "adapter_model.safetensors").read_bytes() == weights
    # Still readable as it is, through the tenant's contents (plaintext blobs: no sealed row yet).
    before = materialize_source(platform.store, source, home / "registry", db=platform.db, private_root=tmp_path / "a")
    assert Path(before, "adapter_model.safetensors").read_bytes() == weights

    report = seal_plaintext_uploads(platform.db, platform.store, registry_root=home / "registry")
    assert (report.sealed, report.plaintext_removed, report.copies_removed) == (3, 3, 1), report
    assert files_containing(artifacts, weights) == [] and not cached.exists()
    _, rows, source = version_of(platform, "tenant-a", model)
    assert all(rows.values())
    after = materialize_source(platform.store, source, home / "registry", db=platform.db, private_root=tmp_path / "b")
    assert Path(after, "adapter_model.safetensors").read_bytes() == weights and not list((home / "registry").iterdir())
    assert seal_plaintext_uploads(platform.db, platform.store, registry_root=home / "registry").sealed == 0


def test_a_worker_decrypts_a_sealed_version_into_the_jobs_inputs_and_removes_it_when_the_run_ends(platform, tmp_path):
    """The worker materializes the version a job continues into DIR/inputs/models (never the shared cache) and
    removes it with the inputs when the run ends (here: cancelled as soon as it started)."""
    from tuneforge.scheduler.executors import build_executor
    from tuneforge.scheduler.worker import Worker

    home, weights = platform.home, marker() + b" not safetensors"
    made_by, _ = make_job(platform.db, tenant="tenant-a")
    model = register(platform.db, platform.store, home, made_by, weights)
    shutil.rmtree(home / "jobs" / made_by / "adapter")  # the worker would have sealed it: the registry's copy is read
    with platform.db.session() as session:  # the registering job's own run is over
        assert states.cancel(session, job_id=made_by)
    path, _ = canary_dataset(tmp_path / "train.jsonl")
    file_id = platform.upload(path)
    assert platform.validate() == 1
    job = platform.http().post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id,
                                                             "tuneforge": FAST_JOB}).json()
    worker = Worker(platform.db, platform.settings, build_executor("local", gpus=None, gpu_type=None, cpu_slots=1))
    worker.run_once()
    job_dir = platform.settings.jobs_dir / job["id"]
    base = Path(read_spec(job_dir).model.base_model)
    assert base.parent == job_dir / "inputs" / "models" and (base / "adapter_model.safetensors").read_bytes() == weights
    assert not (home / "registry").exists()
    assert platform.http().post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
    deadline = time.monotonic() + 120
    while (done := platform.http().get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"] not in (
            "succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        worker.run_once()
        time.sleep(0.2)
    assert done["status"] == "cancelled", done["error"]
    while job["id"] in worker.attempts:  # the worker stops the recipe, then ends the run
        assert time.monotonic() < deadline
        worker.run_once()
        time.sleep(0.2)
    assert not (job_dir / "inputs").exists() and files_containing(home, weights[:22]) == []


def test_the_playground_writes_a_sealed_version_only_into_the_folder_of_its_process(platform, tmp_path):
    """What the API hands the playground pool for a sealed version names no file yet: the adapter is decrypted into
    the serving child's folder when loaded, and goes with that folder when the child stops."""
    import subprocess
    import sys

    import httpx

    from tuneforge.api.playground_pool import PlaygroundProcess, materialize_target

    weights = marker() + b" adapter"
    made_by, _ = make_job(platform.db, tenant="tenant-a")
    model = register(platform.db, platform.store, platform.home, made_by, weights)
    shutil.rmtree(platform.home / "jobs" / made_by / "adapter")  # as the worker seals it
    _, _, source = version_of(platform, "tenant-a", model)
    target = materialize_target(platform.store, source, db=platform.db, private=True)
    assert target.base == "tiny-llama" and target.adapter is None and target.has_adapter
    assert target.adapter_name == materialize_target(platform.store, source, db=platform.db, private=True).adapter_name
    assert not (platform.home / "registry").exists()  # nothing written for it outside a child's folder

    pool = platform.app.state.playground
    workdir = platform.home / "run" / "playground-test"
    workdir.mkdir(parents=True)
    child = PlaygroundProcess(base=target.base, process=subprocess.Popen([sys.executable, "-c", "pass"]),
                              url="http://127.0.0.1:9", client=httpx.Client(), workdir=workdir)
    adapter = target.sealed.write_adapter(child.workdir / "models")
    assert adapter.is_relative_to(workdir) and (adapter / "adapter_model.safetensors").read_bytes() == weights
    pool._stop(child)
    assert not workdir.exists() and files_containing(platform.home, weights[:22]) == []


@pytest.mark.slow
def test_continued_training_and_the_playground_read_a_sealed_version_and_leave_no_plaintext(platform, tmp_path,
                                                                                           tiny_model_dir):
    """A real worker continues training a sealed adapter version (decrypted into the job's inputs, merged into the
    job's base-merged, both gone when the run ends), and the playground answers from it (decrypted into its
    process's folder, gone when the process stops): afterwards no file under TUNEFORGE_HOME holds its weights."""
    from test_playground import random_adapter

    from tuneforge.scheduler.executors import build_executor
    from tuneforge.scheduler.worker import Worker

    home = platform.home
    source_job, _ = make_job(platform.db, tenant="tenant-a")
    job_dir = home / "jobs" / source_job
    random_adapter(tiny_model_dir, job_dir / "adapter", 5)
    (job_dir / ENVIRONMENT_FILE).write_text("{}")
    weights = hashlib.sha256((job_dir / "adapter" / "adapter_model.safetensors").read_bytes()).hexdigest()
    with platform.db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=source_job)
        model = register_job_output(session, job=job, job_dir=job_dir, home=home, output="adapter",
                                    store=platform.store).id
    shutil.rmtree(job_dir / "adapter")  # the worker would have sealed it; the registry's sealed copy is what is read
    assert weights not in sha256_files(home)

    path, _ = canary_dataset(tmp_path / "train.jsonl")
    file_id = platform.upload(path)
    assert platform.validate() == 1
    submitted = platform.http().post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file_id,
                                                                   "tuneforge": FAST_JOB})
    assert submitted.status_code == 200, submitted.text
    continued = submitted.json()["id"]
    worker = Worker(platform.db, platform.settings, build_executor("local", gpus=None, gpu_type=None, cpu_slots=1))
    deadline = time.monotonic() + 300
    while (status := platform.http().get(f"/v1/fine_tuning/jobs/{continued}").json())["status"] not in (
            "succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        worker.run_once()
        time.sleep(0.2)
    assert status["status"] == "succeeded", status["error"]
    continued_dir = home / "jobs" / continued
    assert read_spec(continued_dir).model.base_model.startswith(str(continued_dir / "inputs" / "models"))
    assert not (continued_dir / "inputs").exists() and not list(continued_dir.glob("*base-merged*"))
    assert not (home / "registry").exists() and weights not in sha256_files(home)

    pool = platform.app.state.playground
    try:
        answer = platform.http().post("/v1/chat/completions", json={"model": model, "messages": ASK,
                                                                    "max_tokens": 4, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["model"] == model, answer.text
        (folder,) = (home / "run").glob("playground-*")
        assert weights in sha256_files(folder / "models")  # decrypted for the process serving it, there only
    finally:
        pool.close()
    assert not list((home / "run").glob("playground-*")) and not (home / "registry").exists()
    assert weights not in sha256_files(home)
