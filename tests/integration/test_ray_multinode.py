"""Multi-node jobs through the scheduler on a local Ray cluster of two nodes (`ray.cluster_utils.Cluster`,
one CPU each, its GCS on a port Ray picks: Redis holds 6379 here): the Ray executor places the job as a
STRICT_SPREAD placement group, torchrun's c10d rendezvous joins the two nodes, and the whole loss curve
equals one process's with the same global batch (CURVE_TOLERANCE). The 2-node run is the first on a fresh
model cache: its main rank builds tiny-llama while the other rank waits, so equal curves also show that the
build leaves that rank's RNG, and with it the adapter's initialization, as every other rank has it (it did
not: README, "Several nodes through the scheduler"). Behind `slow`: a node killed mid-job, the job restarted
in place by the worker from its last sharded checkpoint once a replacement node joins, its curve that of an
uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from conftest import EXAMPLE_DATA, REPO

from tuneforge.db import files as file_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.engine.events import read_events
from tuneforge.launch.commands import recipe_command
from tuneforge.launch.supervisor import supervise
from tuneforge.registry.artifacts import LocalArtifactStore
from tuneforge.registry.datasets import inspect_dataset
from tuneforge.scheduler.admission import admit_job
from tuneforge.scheduler.worker import Worker
from tuneforge.settings import Settings
from tuneforge.spec import validate_job_spec
from tuneforge.spec.jobdir import read_spec, write_spec

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")

# Global batch 8 every time: 2 nodes x 1 process x 4, or 1 process x 4 x 2 accumulation steps. SGD without
# warmup: an update linear in the gradient, so any difference in the gradients shows at step 2 (Adam's
# per-element normalization hides a difference of scale).
# Measured equal to every printed digit (gloo's sum of two ranks vs one process's accumulation); relative.
CURVE_TOLERANCE = 1e-6
SECTIONS = {
    "model": {"base_model": "tiny-llama"},
    "dataset": {"path": "", "max_seq_length": 512},
    "adapter": {"type": "lora", "rank": 8, "alpha": 16, "dropout": 0.0},  # dropout would draw other masks per rank
    "training": {"batch_size": 8, "per_device_batch_size": 4, "gradient_accumulation_steps": 1, "seed": 0,
                 "optimizer": "sgd", "learning_rate": 0.5, "warmup_ratio": 0.0},
    "evaluation": {"metrics": ["loss"], "max_eval_examples": 2, "eval_before_training": False},
    "resources": {"num_nodes": 2, "num_gpus": 1, "gpu_type": "cpu", "strategy": "ddp"},
}


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a worker node, each with one CPU: STRICT_SPREAD cannot put two bundles on one."""
    cluster = cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
    except Exception:  # noqa: BLE001 - Ray gives a raylet 30 s to register; a busy machine may need a second try
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def sections(**changes) -> dict:
    data = json.loads(json.dumps(SECTIONS))
    for section, values in changes.items():
        data.setdefault(section, {}).update(values)
    return data


def submit(db: Database, settings: Settings, data: dict) -> str:
    """The job created and admitted as the API would, on the example training file."""
    store = LocalArtifactStore(settings.artifacts_dir)
    with open(EXAMPLE_DATA / "train.jsonl", "rb") as handle, store.staging(handle, filename="train.jsonl",
                                                                           max_bytes=1 << 30) as staged:
        report = inspect_dataset(staged.path, display_name="train.jsonl")
        store.commit(staged)
    spec = validate_job_spec(data)
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
    return job.id


def scheduler(tmp_path: Path) -> tuple[Database, Settings, Worker]:
    from tuneforge.scheduler.executors.ray_cluster import RayExecutor

    settings = Settings.from_env(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", heartbeat_seconds=0.5,
                                 lease_seconds=60, poll_seconds=0.2)
    db = Database(settings.database_url)
    upgrade(db.engine)
    return db, settings, Worker(db, settings, RayExecutor(), worker_id="ray-worker")


def run_until_done(db: Database, worker: Worker, job_id: str, *, timeout_s: float = 1200, while_running=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        worker.run_once()
        if while_running is not None:
            while_running()
        with db.session() as session:
            job = job_rows.get_job_any_tenant(session, job_id=job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout_s}s")


def losses(job_dir: Path) -> dict[int, float]:
    return {e["data"]["step"]: e["data"]["train_loss"] for e in read_events(job_dir)
            if e["type"] == "metrics" and "train_loss" in e["data"]}


def one_process_losses(tmp_path: Path, data: dict) -> dict[int, float]:
    """The same job as one process, 2 accumulation steps for the same global batch, run by the supervisor."""
    data = json.loads(json.dumps(data))
    data["dataset"]["path"] = str(EXAMPLE_DATA / "train.jsonl")
    data["training"]["gradient_accumulation_steps"] = 2
    data["resources"] = {"gpu_type": "cpu"}
    job_dir = tmp_path / "one-process"
    job_dir.mkdir()
    write_spec(job_dir, validate_job_spec(data))
    env = {"TUNEFORGE_HOME": os.environ["TUNEFORGE_HOME"], "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    assert supervise(job_dir, recipe_command(read_spec(job_dir), job_dir), max_restarts=0, env=env).status == "succeeded"
    return losses(job_dir)


def assert_same_curve(ours: dict[int, float], reference: dict[int, float], steps: int,
                      tolerance: float = CURVE_TOLERANCE) -> None:
    assert sorted(ours) == sorted(reference) == list(range(1, steps + 1)), (ours, reference)
    for step, loss in reference.items():
        assert abs(ours[step] - loss) / abs(loss) < tolerance, f"step {step}: {ours[step]} vs {loss}"


@pytest.fixture(scope="module")
def two_node_run(two_nodes, tmp_path_factory):
    """One 2-node DDP job through the worker, and the same job as one process: (job dir, its losses, the
    one process's losses)."""
    tmp_path = tmp_path_factory.mktemp("two-node-run")
    data = sections(training={"max_steps": 4}, checkpoint={"max_restarts": 0})
    with pytest.MonkeyPatch.context() as patch:  # the autouse home is per test; this run is per module
        patch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
        db, settings, worker = scheduler(tmp_path)
        assert [node.gpu_type for node in worker.nodes] == ["cpu", "cpu"]
        job_id = submit(db, settings, data)
        job = run_until_done(db, worker, job_id)
        assert job.status == "succeeded", job.error
        db.dispose()
        job_dir = settings.jobs_dir / job_id
        ours, reference = losses(job_dir), one_process_losses(tmp_path, data)
    print(f"2 nodes on Ray: {ours}\n1 process:      {reference}")
    return job_dir, ours, reference


def test_a_two_node_job_runs_through_the_scheduler_as_a_placement_group(two_node_run):
    job_dir, ours, reference = two_node_run
    summary = json.loads((job_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp"
    assert sorted(ours) == [1, 2, 3, 4] and ours[4] < ours[1]  # every step, once, and it trained
    # The same weights, the same adapter on both ranks and the same global batch split across the nodes:
    # every step as one process.
    assert_same_curve(ours, reference, 4)
    # The gang's placement group is gone with the run, and so are its actors: both nodes' CPUs are free.
    groups = ray.util.placement_group_table().values()
    assert groups and all(group["state"] == "REMOVED" for group in groups)
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == 2


def _recipe_node(actor) -> tuple[str, int]:
    """(Ray node id, recipe process id) of one gang actor."""
    return ray.get(actor.__ray_call__.remote(lambda self: (ray.get_runtime_context().get_node_id(), self.process.pid)))


@pytest.mark.slow
def test_a_node_killed_mid_job_resumes_from_the_last_sharded_checkpoint_on_a_replacement_node(two_nodes, tmp_path):
    steps = 10
    data = sections(training={"max_steps": steps}, checkpoint={"every_steps": 2, "keep_last": 2, "max_restarts": 1},
                    resources={"strategy": "fsdp"})  # one checkpoint shard file per rank
    db, settings, worker = scheduler(tmp_path)
    job_id = submit(db, settings, data)
    job_dir = settings.jobs_dir / job_id
    killed: dict[str, int] = {}

    def kill_the_worker_node_after_a_checkpoint():
        if killed or not list((job_dir / "checkpoints").glob("step-*/manifest.json")):
            return
        run = worker.attempts[job_id].run
        if run is None:  # still waiting for its placement group
            return
        head = ray.get_runtime_context().get_node_id()
        victim = next(node for node in two_nodes.worker_nodes)
        for actor in run.actors:
            node_id, pid = _recipe_node(actor)
            if node_id != head:  # the machine is gone: torchrun and its ranks at once, no SIGTERM, no checkpoint
                import psutil

                tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
                for process in tree:
                    process.send_signal(signal.SIGKILL)
        two_nodes.remove_node(victim, allow_graceful=False)
        killed["at_step"] = max(losses(job_dir))
        two_nodes.add_node(num_cpus=1)  # a replacement joins; the restart waits for it

    job = run_until_done(db, worker, job_id, timeout_s=1800, while_running=kill_the_worker_node_after_a_checkpoint)
    assert killed, "the job finished before a checkpoint was seen"
    assert job.status == "succeeded", job.error
    assert job.restarts == 1
    resumed = [e["data"]["step"] for e in read_events(job_dir) if e["data"].get("kind") == "resumed"]
    assert resumed and 2 <= resumed[-1] <= killed["at_step"]
    # The same job uninterrupted, on the cluster with its replacement node.
    uninterrupted = run_until_done(db, worker, submit(db, settings, data), timeout_s=1800)
    assert uninterrupted.status == "succeeded", uninterrupted.error
    reference = losses(settings.jobs_dir / uninterrupted.id)
    print(f"killed at step {killed['at_step']}, resumed from step {resumed[-1]}\nresumed: {losses(job_dir)}\n"
          f"uninterrupted: {reference}")
    resumed_losses = losses(job_dir)
    assert sorted(resumed_losses) == sorted(reference) == list(range(1, steps + 1))
    # The killed run was the first on its model cache and the uninterrupted one the second: equal anyway.
    assert_same_curve(resumed_losses, reference, steps)
    db.dispose()
