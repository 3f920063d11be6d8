"""The Ray executor against a local Ray cluster the test starts (2 CPUs): a worker places a job on the
cluster's node, the recipe runs in an actor, its events reach the database and the job succeeds."""

from __future__ import annotations

import time

import pytest
from test_ray_multinode import submit  # the job created and admitted as the API would

from tuneforge.db import jobs as job_rows
from tuneforge.db import job_events as event_rows
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.scheduler.worker import Worker
from tuneforge.settings import Settings

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
    job_id = submit(db, settings, {"model": {"base_model": "tiny-llama"},
                                   "dataset": {"path": "", "max_seq_length": 256},
                                   "training": {"max_steps": 3}, "evaluation": {"max_eval_examples": 2}})

    executor = RayExecutor()
    worker = Worker(db, settings, executor, worker_id="ray-worker")
    assert worker.nodes and worker.nodes[0].gpu_type == "cpu"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        worker.run_once()
        with db.session() as session:
            status = job_rows.get_job_any_tenant(session, job_id=job_id).status
        if status in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    with db.session() as session:
        done = job_rows.get_job_any_tenant(session, job_id=job_id)
        events, _ = event_rows.list_events(session, job_id=job_id, limit=500)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model and done.lease_owner is None
    assert any(e.type == "metrics" and e.data["step"] == 3 for e in events)
    db.dispose()
