"""End to end against a real `tuneforge server` process (API + scheduler + local worker), with the official
`openai` client, on SQLite and on PostgreSQL: a job goes through its statuses to succeeded and leaves
events, metrics, checkpoints and a model; a running job is paused, resumed from its checkpoint and
cancelled; a worker killed mid-job loses its lease and another finishes the job from its checkpoint."""

from __future__ import annotations

import fcntl
import os
import signal
import time

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess

openai = pytest.importorskip("openai")

FAST = {
    "training": {"max_steps": 4, "per_device_batch_size": 4},
    "dataset": {"max_seq_length": 256},
    "evaluation": {"max_eval_examples": 4},
    "checkpoint": {"every_steps": 2},
}


def long_job(steps: int, every: int, batch: int = 2) -> dict:
    return {**FAST, "training": {"max_steps": steps, "per_device_batch_size": batch}, "checkpoint": {"every_steps": every},
            "evaluation": {"max_eval_examples": 2, "eval_before_training": False}}


def wait_for(predicate, *, timeout: float = 180.0, what: str, server: ServerProcess | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tail = server.log_text()[-4000:] if server else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


@pytest.fixture
def server(tmp_path, database_url):
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", database_url)
    yield process
    process.stop()


@pytest.fixture
def api_only_server(tmp_path, database_url):
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", database_url, worker=False)
    yield process
    process.stop()


def client_for(server: ServerProcess, tenant: str = "tenant-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys[tenant], max_retries=0, timeout=30)


def upload(client, name: str = "train.jsonl"):
    """Upload and wait until the scheduler has validated the file."""
    with open(EXAMPLE_DATA / name, "rb") as handle:
        file = client.files.create(file=handle, purpose="fine-tune")
    return client.files.wait_for_processing(file.id, poll_interval=0.1, max_wait_seconds=60)


def test_job_runs_to_succeeded_with_events_checkpoints_and_model(server):
    client = client_for(server)
    training, validation = upload(client), upload(client, "val.jsonl")
    assert training.status == "processed" and training.filename == "train.jsonl"
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training.id, validation_file=validation.id, suffix="e2e", seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4,
                                                                           "learning_rate_multiplier": "auto"}}},
        metadata={"team": "qa"}, extra_body={"tuneforge": {k: v for k, v in FAST.items() if k != "training"}
                                             | {"training": {"max_steps": 4}}},
    )
    assert job.id.startswith("ftjob-") and job.status == "queued" and job.seed == 7
    assert job.hyperparameters.batch_size == 4 and job.metadata == {"team": "qa"}

    seen = []

    def finished():
        current = client.fine_tuning.jobs.retrieve(job.id)
        if not seen or seen[-1] != current.status:
            seen.append(current.status)
        return current if current.status in ("succeeded", "failed", "cancelled") else None

    done = wait_for(finished, what="the job to finish", server=server)
    assert done.status == "succeeded", done.error
    assert seen[-1] == "succeeded" and set(seen) <= {"queued", "running", "succeeded"}
    assert done.fine_tuned_model.startswith("ft:tiny-llama:tenant-a:e2e:")
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at >= done.created_at

    events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
    messages = [e.message for e in events]
    assert "The job has successfully completed" == messages[0]  # newest first
    assert any(m.startswith("Fine-tuning job started") for m in messages)
    assert any(e.type == "metrics" and e.data["step"] == 4 for e in events)
    assert all(e.level in ("info", "warn", "error") for e in events)

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints][:2] == [4, 2]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-4"
    assert checkpoints[0].metrics.train_loss > 0

    assert done.fine_tuned_model in [m.id for m in client.models.list().data]
    assert client.models.retrieve(done.fine_tuned_model).owned_by == "tenant-a"

    headers = {"Authorization": f"Bearer {server.keys['tenant-a']}"}
    metrics = httpx.get(f"{server.url}/v1/fine_tuning/jobs/{job.id}/metrics", headers=headers).json()["data"]
    assert [p["step"] for p in metrics] == [1, 2, 3, 4] and all("train_loss" in p["values"] for p in metrics)
    with httpx.stream("GET", f"{server.url}/v1/fine_tuning/jobs/{job.id}/events/stream", headers=headers, timeout=30) as sse:
        body = "".join(sse.iter_text())
    assert body.rstrip().endswith('data: {"status": "succeeded"}') and body.count("event: fine_tuning.job.event") == len(events)
    usage = httpx.get(f"{server.url}/v1/tuneforge/usage", headers=headers).json()
    assert usage["by_status"]["succeeded"]["gpu_hours"] > 0

    # Another tenant sees none of it.
    other = client_for(server, "tenant-b")
    with pytest.raises(openai.NotFoundError):
        other.fine_tuning.jobs.retrieve(job.id)
    assert done.fine_tuned_model not in [m.id for m in other.models.list().data]

    deleted = client.models.delete(done.fine_tuned_model)
    assert deleted.deleted and done.fine_tuned_model not in [m.id for m in client.models.list().data]


def _lock_free(job_dir) -> bool:
    """True once no recipe process holds the job directory."""
    fd = os.open(job_dir / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.slow_on_postgresql
def test_pause_resume_and_cancel_a_running_job(server):
    client = client_for(server)
    training = upload(client)
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id,
                                         extra_body={"tuneforge": long_job(steps=100_000, every=10)})
    wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, what="a first checkpoint", server=server)

    paused = client.fine_tuning.jobs.pause(job.id)
    assert paused.status == "paused"
    job_dir = server.home / "jobs" / job.id
    wait_for(lambda: _lock_free(job_dir), what="the recipe to stop on pause", server=server)
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.pause(job.id)

    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "queued" and resumed.model_extra["tuneforge"]["attempt"] == 2
    wait_for(lambda: any(e.data and e.data.get("kind") == "resumed"
                         for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data),
             what="attempt 2 to resume from a checkpoint", server=server)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"

    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    wait_for(lambda: _lock_free(job_dir), what="the recipe to stop on cancel", server=server)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job.id)


@pytest.mark.slow_on_postgresql
def test_killed_worker_job_is_requeued_and_finishes_from_its_checkpoint(api_only_server):
    server = api_only_server
    client = client_for(server)
    training = upload(client)
    worker = server.start_worker()
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=training.id,
                                         extra_body={"tuneforge": long_job(steps=120, every=5, batch=8)})
    wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, what="a first checkpoint", server=server)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert client.fine_tuning.jobs.retrieve(job.id).status == "running"  # until its lease runs out

    server.start_worker()
    done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
                    what="the job to finish on the second worker", server=server)
    assert done.status == "succeeded", done.error
    assert done.model_extra["tuneforge"]["attempt"] == 2
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    assert any("re-queued" in e.message for e in events)
    resumed = [e for e in events if e.data and e.data.get("kind") == "resumed"]
    assert resumed and resumed[0].data["step"] >= 5
