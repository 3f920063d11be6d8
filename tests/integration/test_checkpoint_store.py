"""Kept checkpoints through the object store (moto's S3-compatible server): the worker that ran a job publishes the
checkpoints retention keeps (their weights, not their resume state) sealed for the job's tenant; a worker on another
machine, without that job directory, stages them, checked against the manifest the checkpoint's row records, and
assembles ft:...:ckpt-step-N with the checkpoint's very tensors. A missing or altered object, or a shredded tenant
key, fails by name; retention pruning and deleting the model drop the links, and the collector the objects."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import random_lora_adapter
from test_registry_db import db, make_job  # noqa: F401 - db is the fixture

from tuneforge.db import job_events as event_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import models as model_rows
from tuneforge.db.tables import StoredObject
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.checkpoints import CheckpointUnavailable, kept_checkpoint
from tuneforge.registry.models import delete_model_and_version, materialize_source, model_source, register_job_output
from tuneforge.registry.storage.backends import S3Store
from tuneforge.registry.storage.jobs import PUBLISHED_FILES, publish_checkpoints, publish_outputs, stage_registered_model
from tuneforge.registry.storage.keys import FolderKeyProvider
from tuneforge.registry.storage.tenant_store import TenantStore
from tuneforge.settings import Settings

torch = pytest.importorskip("torch")


def checkpoint_links(store: TenantStore, job_id: str) -> dict[str, str]:
    return {name: obj.id for name, (kind, obj) in store.linked(tenant_id="t", owner=job_id).items()
            if kind == "checkpoint"}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the store's rows are tested on both elsewhere
def test_a_checkpoint_made_elsewhere_is_trained_from_through_the_object_store(db, s3_server, tmp_path):
    from safetensors.torch import load_file

    from tuneforge.engine.base_models import ensure_builtin_model
    from tuneforge.scheduler.blobs import BlobCollector

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    home = Path(os.environ["TUNEFORGE_HOME"])
    bucket = s3_server.new_bucket()
    keys = FolderKeyProvider(tmp_path / "keys")
    store = TenantStore(db, S3Store(bucket, "tf", endpoint_url=s3_server.endpoint_url), keys=keys,
                        scratch=LocalArtifactStore(tmp_path / "scratch"))
    machine_1 = LocalArtifactStore(tmp_path / "machine-1")  # plaintext blobs, as in test_registered_model_store
    base_dir = ensure_builtin_model("tiny-llama")

    # Job A on machine 1: its final adapter and checkpoints at steps 2 and 4, as save_training_checkpoint leaves them.
    job_a, _ = make_job(db, keep_last=1)
    job_dir = home / "jobs" / job_a
    random_lora_adapter(base_dir, job_dir / "adapter", seed=1)
    for step, seed in {2: 2, 4: 3}.items():
        folder = job_dir / "checkpoints" / f"step-{step:06d}"
        random_lora_adapter(base_dir, folder, seed=seed)
        (folder / "adapter_config.json").unlink()
        (folder / "README.md").unlink(missing_ok=True)
        (folder / "optimizer.pt").write_bytes(b"optimizer state")
        (folder / "rng.pt").write_bytes(b"rng state")
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
        with db.session() as session:
            event_rows.record_checkpoint(session, job_id=job_a, step=step, path=f"checkpoints/step-{step:06d}", size=1,
                                         metrics={"train_loss": 1.0}, created_at=None)
    weights = load_file(str(job_dir / "checkpoints" / "step-000004" / "adapter_model.safetensors"))

    # Published as the worker does before the job succeeds (here keeping both, so that registering the output,
    # whose retention keeps the newest one, has a published checkpoint to prune).
    publish_outputs(store, tenant_id="t", job_id=job_a, job_dir=job_dir)
    assert publish_checkpoints(store, tenant_id="t", job_id=job_a, job_dir=job_dir, keep_last=2, best_step=None,
                               keys=keys) == [2, 4]
    assert sorted(checkpoint_links(store, job_a)) == ["checkpoints/step-000002/adapter_model.safetensors",
                                                      "checkpoints/step-000004/adapter_model.safetensors"]
    sealed = [store.backend.open(key).read() for key in store.backend.keys("t/")]
    raw = (job_dir / "checkpoints" / "step-000004" / "adapter_model.safetensors").read_bytes()
    assert sealed and not any(raw[-4096:] in data for data in sealed)  # sealed under the tenant's key
    with db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=job_a)
        model_id = register_job_output(session, job=job, job_dir=job_dir, home=home, output="adapter",
                                       store=machine_1).id
        job.status = "succeeded"
    pruned = checkpoint_links(store, job_a)
    assert list(pruned) == ["checkpoints/step-000004/adapter_model.safetensors"]  # step 2's link went with it
    with db.read_session() as session:
        manifest = kept_checkpoint(session, job_id=job_a, step=4).metrics[PUBLISHED_FILES]
    assert [entry["path"] for entry in manifest] == ["adapter_model.safetensors"]

    # Machine 2 has neither the job directory nor machine 1's artifact folder.
    shutil.rmtree(job_dir)
    checkpoint_id = f"{model_id}:ckpt-step-4"
    with db.session() as session:
        source = model_source(session, tenant_id="t", base_model=checkpoint_id, home=home)
    machine_2 = LocalArtifactStore(tmp_path / "machine-2")
    stage_registered_model(store, machine_2, tenant_id="t", source=source)
    with pytest.raises(CheckpointUnavailable, match="step 4 of job .* is not on this worker, and no object store"):
        materialize_source(machine_2, source, tmp_path / "registry", db=db, private_root=tmp_path / "none")
    private = tmp_path / "job-b" / "inputs" / "models"
    assembled = Path(materialize_source(machine_2, source, tmp_path / "registry", db=db, private_root=private,
                                        object_store=store))
    assert assembled.is_relative_to(private) and not list(private.glob(".staging-*"))
    got = load_file(str(assembled / "adapter_model.safetensors"))
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)
    assert json.loads((assembled / "adapter_config.json").read_text())["r"] == 4  # the version's config
    assert not (assembled / "optimizer.pt").exists() and not (assembled / "rng.pt").exists()

    # Job B's run starts from those weights: the adapter PEFT loads from the assembled folder is the checkpoint's.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), assembled)
    lora = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(lora) == len(weights)
    for name, tensor in weights.items():
        assert torch.equal(lora[name.replace(".weight", ".default.weight")], tensor)

    def stage(where: str):
        return materialize_source(machine_2, source, tmp_path / where, db=db, private_root=tmp_path / where / "p",
                                  object_store=store)

    # An altered manifest (what staging checks each fetched file against), a shredded tenant key, a missing object.
    with db.session() as session:
        row = kept_checkpoint(session, job_id=job_a, step=4)
        row.metrics = {**row.metrics, PUBLISHED_FILES: [{**manifest[0], "sha256": "0" * 64}]}
    with pytest.raises(CheckpointUnavailable, match="adapter_model.safetensors in the object store is not the "
                                                    "published file"):
        stage("forged")
    assert not list((tmp_path / "forged" / "p").glob(".staging-*"))  # nothing half-staged left
    with db.session() as session:
        row = kept_checkpoint(session, job_id=job_a, step=4)
        row.metrics = {**row.metrics, PUBLISHED_FILES: manifest}
    with db.read_session() as session:
        obj = store.linked(tenant_id="t", owner=job_a)["checkpoints/step-000004/adapter_model.safetensors"][1]
    store.backend.delete(obj.location)
    with pytest.raises(CheckpointUnavailable, match="step 4 of job .*: adapter_model.safetensors is not in the "
                                                    "object store"):
        stage("missing")

    # Deleting A's model drops the checkpoint's links at once; the collector then removes its object.
    with db.session() as session:
        delete_model_and_version(session, model=model_rows.get_model(session, tenant_id="t", model_id=model_id))
    assert checkpoint_links(store, job_a) == {}
    settings = Settings.from_env(database_url=db.engine.url.render_as_string(hide_password=False),
                                 artifacts_dir=tmp_path / "machine-1", store_url=f"s3://{bucket}/tf",
                                 s3_endpoint_url=s3_server.endpoint_url, keys_dir=str(tmp_path / "keys"),
                                 blob_grace_seconds=0)
    with db.read_session() as session:
        assert session.get(StoredObject, obj.seq) is not None  # unlinked, still recorded until the collector runs
    time.sleep(1.1)  # the collector removes what is older than its grace period (whole seconds)
    BlobCollector(db, settings, machine_1).run_once()
    with db.read_session() as session:
        assert session.get(StoredObject, obj.seq) is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_shredded_tenant_checkpoint_cannot_be_staged(db, s3_server, tmp_path):
    """Sealed under the tenant's key: once it is destroyed, staging names the reason, and leaves nothing."""
    from tuneforge.registry.storage.jobs import StoreUnavailable, stage_checkpoint

    keys = FolderKeyProvider(tmp_path / "keys")
    store = TenantStore(db, S3Store(s3_server.new_bucket(), "tf", endpoint_url=s3_server.endpoint_url), keys=keys,
                        scratch=LocalArtifactStore(tmp_path / "scratch"))
    job_id, _ = make_job(db)
    job_dir = tmp_path / "jobs" / job_id
    folder = job_dir / "checkpoints" / "step-000003"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"full weights")
    (folder / "optimizer.pt").write_bytes(b"optimizer state")
    with db.session() as session:
        event_rows.record_checkpoint(session, job_id=job_id, step=3, path="checkpoints/step-000003", size=1,
                                     metrics={}, created_at=None)
    assert publish_checkpoints(store, tenant_id="t", job_id=job_id, job_dir=job_dir, keep_last=1, best_step=None) == [3]
    with db.read_session() as session:
        manifest = kept_checkpoint(session, job_id=job_id, step=3).metrics[PUBLISHED_FILES]
    dest = tmp_path / "staged"
    staged = stage_checkpoint(store, tenant_id="t", job_id=job_id, path="checkpoints/step-000003", step=3,
                              manifest=manifest, dest=dest)
    assert [p.name for p in staged.iterdir()] == ["model.safetensors"]
    assert (staged / "model.safetensors").read_bytes() == b"full weights"
    shutil.rmtree(dest)
    store.shred("t")
    with pytest.raises(StoreUnavailable, match="the tenant key is gone"):
        stage_checkpoint(store, tenant_id="t", job_id=job_id, path="checkpoints/step-000003", step=3,
                         manifest=manifest, dest=dest)
    assert not dest.exists()
    with pytest.raises(StoreUnavailable, match="published it to no object store"):
        stage_checkpoint(store, tenant_id="t", job_id=job_id, path="checkpoints/step-000003", step=3,
                         manifest=None, dest=dest)


@pytest.mark.slow  # two real training jobs on two worker processes with homes of their own: tens of seconds
def test_a_job_on_another_machine_trains_from_a_kept_checkpoint_through_the_store(s3_server, tmp_path, monkeypatch):
    """Job A runs on worker 1 and succeeds; its job directory then goes (worker 2 has a home of its own anyway). Job B,
    on worker 2, trains from A's kept checkpoint: the adapter it starts from holds the checkpoint's very tensors.
    Encryption at rest is off here so the assembled model stays on disk to compare (sealing: the tests above)."""
    import subprocess
    import sys

    import httpx
    from conftest import ServerProcess, chat, write_jsonl
    from safetensors.torch import load_file

    from tuneforge.db.session import Database
    from tuneforge.db.tables import ObjectLink

    bucket = s3_server.new_bucket()
    for name, value in {"TUNEFORGE_STORE_URL": f"s3://{bucket}/tf", "TUNEFORGE_S3_ENDPOINT_URL": s3_server.endpoint_url,
                        "TUNEFORGE_ENCRYPT_AT_REST": "false"}.items():
        monkeypatch.setenv(name, value)
    data = write_jsonl(tmp_path / "train.jsonl", [chat(f"question {n}", f"answer {n}") for n in range(16)])
    (tmp_path / "api").mkdir()
    database_url = f"sqlite:///{tmp_path / 'tuneforge.db'}"
    server = ServerProcess(tmp_path / "api", database_url, worker=False)
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['tenant-a']}"}, timeout=30)
    tuneforge = {"training": {"max_steps": 2, "per_device_batch_size": 4}, "dataset": {"max_seq_length": 128},
                 "evaluation": {"max_eval_examples": 2}, "checkpoint": {"every_steps": 2}}

    def run_on(home: str, model: str) -> dict:
        (tmp_path / home).mkdir()
        env = {**server.env, "TUNEFORGE_HOME": str(tmp_path / home)}
        env.pop("TUNEFORGE_ARTIFACTS_DIR", None)
        worker = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "worker", "--cpu-slots", "1"], env=env,
                                  stdout=server.log, stderr=subprocess.STDOUT)
        try:
            job = http.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": file["id"],
                                                          "tuneforge": tuneforge}).json()
            assert "id" in job, job
            deadline = time.monotonic() + 300
            while (job := http.get(f"/v1/fine_tuning/jobs/{job['id']}").json())["status"] not in (
                    "succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, server.log_text()[-4000:]
                time.sleep(0.3)
            assert job["status"] == "succeeded", ((job.get("error") or {}).get("message"), server.log_text()[-3000:])
            return job
        finally:
            worker.terminate()
            worker.wait(timeout=60)

    try:
        with open(data, "rb") as handle:
            file = http.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": ("train.jsonl", handle)}).json()
        deadline = time.monotonic() + 60
        while http.get(f"/v1/files/{file['id']}").json()["status"] == "uploaded":
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.2)
        job_a = run_on("worker-1", "tiny-llama")
        a_dir = tmp_path / "worker-1" / "jobs" / job_a["id"]
        weights = load_file(str(a_dir / "checkpoints" / "step-000002" / "adapter_model.safetensors"))
        shutil.rmtree(a_dir)  # as on a machine that is gone
        checkpoint_id = f"{job_a['fine_tuned_model']}:ckpt-step-2"
        assert checkpoint_id in [m["id"] for m in http.get("/v1/models").json()["data"]]
        job_b = run_on("worker-2", checkpoint_id)
        assembled = list((tmp_path / "worker-2" / "registry").glob("*-ckpt-step-2"))
        assert len(assembled) == 1, list((tmp_path / "worker-2" / "registry").iterdir())
        got = load_file(str(assembled[0] / "adapter_model.safetensors"))
        assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)

        # B's adapter was trained on A's checkpoint, so it goes first; then A's checkpoint links go with A's model.
        assert http.delete(f"/v1/models/{job_b['fine_tuned_model']}").status_code == 200
        db = Database(database_url)
        try:
            def links() -> list[str]:
                with db.read_session() as session:
                    return [row.name for row in session.query(ObjectLink).filter_by(owner=job_a["id"], kind="checkpoint")]

            assert links() == ["checkpoints/step-000002/adapter_model.safetensors"]
            deleted = http.delete(f"/v1/models/{job_a['fine_tuned_model']}")
            assert deleted.status_code == 200, deleted.text
            assert links() == []
        finally:
            db.dispose()
    finally:
        server.stop()
