"""The Ray executor against a local Ray cluster the test starts (2 CPUs): a worker places a job on the
cluster's node, the recipe runs in an actor, its events reach the database and the job succeeds."""

from __future__ import annotations

import time

import pytest
from conftest import EXAMPLE_DATA

from tuneforge.db import files as file_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import job_events as event_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.datasets import inspect_dataset
from tuneforge.scheduler.admission import admit_job
from tuneforge.scheduler.worker import Worker
from tuneforge.settings import Settings
from tuneforge.spec import validate_job_spec

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def test_a_job_runs_to_success_as_a_ray_actor(ray_cluster, tmp_path):
    from tuneforge.scheduler.executors.ray_cluster import RayExecutor

    settings = Settings.from_env(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", heartbeat_seconds=0.5,
                                 lease_seconds=30, poll_seconds=0.2)
    db = Database(settings.database_url)
    upgrade(db.engine)
    store = LocalArtifactStore(settings.artifacts_dir)
    with open(EXAMPLE_DATA / "train.jsonl", "rb") as handle, store.staging(handle, filename="train.jsonl",
                                                                           max_bytes=1 << 30) as staged:
        report = inspect_dataset(staged.path, display_name="train.jsonl")
        store.commit(staged)
    spec = validate_job_spec({"model": {"base_model": "tiny-llama"}, "dataset": {"path": "", "max_seq_length": 256},
                              "training": {"max_steps": 3}, "evaluation": {"max_eval_examples": 2}})
    with db.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id="t")
        row = file_rows.create_file(session, tenant_id="t", filename="train.jsonl", purpose="fine-tune", size=staged.size,
                                    sha256=staged.sha256, report=report.model_dump(mode="json"), status="processed",
                                    status_details=None)
        spec.dataset.path = row.id
        job = job_rows.create_job(session, tenant_id="t", spec=spec, model="tiny-llama", training_file=row.id,
                                  validation_file=None, suffix=None, metadata=None)
    with db.session() as session:
        assert admit_job(session, job=job)

    executor = RayExecutor()
    worker = Worker(db, settings, executor, worker_id="ray-worker")
    assert worker.nodes and worker.nodes[0].gpu_type == "cpu"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        worker.run_once()
        with db.session() as session:
            status = job_rows.get_job_any_tenant(session, job_id=job.id).status
        if status in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    with db.session() as session:
        done = job_rows.get_job_any_tenant(session, job_id=job.id)
        events, _ = event_rows.list_events(session, job_id=job.id, limit=500)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model and done.lease_owner is None
    assert any(e.type == "metrics" and e.data["step"] == 3 for e in events)
    db.dispose()
