"""Crash restarts and resolved hyperparameters under a real `tuneforge server` (API + scheduler + local worker),
on SQLite and on PostgreSQL: a recipe that crashes once is restarted in place from its checkpoint and the
job succeeds, with a restart event and the job's restart count; bad input (exit 2) is never retried; and
once a job ran, GET /v1/fine_tuning/jobs/{id} shows the numbers the recipe resolved, never server paths."""

from __future__ import annotations

import time

import pytest
from conftest import EXAMPLE_DATA, ServerProcess

openai = pytest.importorskip("openai")

QUICK = {"dataset": {"max_seq_length": 256}, "checkpoint": {"every_steps": 2, "max_restarts": 2},
         "evaluation": {"max_eval_examples": 2, "eval_before_training": False}}


def start_server(tmp_path, database_url, monkeypatch, faults: str = "") -> ServerProcess:
    # The worker hands its environment to the recipes it starts; `restart=0` aims the fault at the first run.
    monkeypatch.setenv("TUNEFORGE_FAULT_INJECTION", faults)
    (tmp_path / "home").mkdir()
    return ServerProcess(tmp_path / "home", database_url)


def submit(server: ServerProcess, training: dict):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=server.keys["tenant-a"], max_retries=0, timeout=30)
    with open(EXAMPLE_DATA / "train.jsonl", "rb") as handle:
        file = client.files.create(file=handle, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=file.id,
                                         extra_body={"tuneforge": {**QUICK, "training": training}})
    return client, file, job


def finished(client, job_id: str, server: ServerProcess, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish\n{server.log_text()[-4000:]}")


@pytest.mark.slow_on_postgresql
def test_a_crash_is_restarted_from_its_checkpoint_and_the_job_reports_resolved_numbers(tmp_path, database_url,
                                                                                      monkeypatch):
    server = start_server(tmp_path, database_url, monkeypatch, faults="crash_at_step=3,restart=0")
    try:
        client, file, job = submit(server, {"max_steps": 4, "per_device_batch_size": 4})
        assert job.hyperparameters.n_epochs == "auto" and job.hyperparameters.learning_rate_multiplier == "auto"
        done = finished(client, job.id, server)
        assert done.status == "succeeded", done.error
        extension = done.model_extra["tuneforge"]
        assert extension["restarts"] == 1 and extension["attempt"] == 1  # restarted in place, not re-queued

        events = client.fine_tuning.jobs.list_events(job.id, limit=500).data
        restarts = [e for e in events if e.data and e.data.get("kind") == "restart"]
        assert len(restarts) == 1 and "InjectedCrash" in restarts[0].message and restarts[0].level == "warn"
        resumed = [e.data["step"] for e in events if e.data and e.data.get("kind") == "resumed"]
        assert resumed == [2]  # the restarted run continued from the checkpoint at step 2
        assert any(e.data and e.data.get("status") == "failed" and e.data.get("retryable") for e in events)

        # The numbers the recipe resolved, as OpenAI reports them; the spec shows file ids, no server path.
        hyper = done.hyperparameters
        assert isinstance(hyper.n_epochs, (int, float)) and isinstance(hyper.batch_size, int)
        assert hyper.learning_rate_multiplier == 1.0  # the LoRA default, 2e-4
        assert extension["spec"]["training"]["per_device_batch_size"] == 4
        assert extension["spec"]["training"]["precision"] == "fp32"
        assert extension["spec"]["dataset"]["path"] == file.id and str(server.home) not in str(extension)
    finally:
        server.stop()


def test_bad_input_fails_at_once_without_a_restart(tmp_path, database_url, monkeypatch):
    server = start_server(tmp_path, database_url, monkeypatch)
    try:
        client, _, job = submit(server, {"max_steps": 4, "precision": "fp16"})  # fp16 needs a GPU: exit 2
        done = finished(client, job.id, server)
        assert done.status == "failed" and "fp16 needs a GPU" in done.error.message
        assert done.model_extra["tuneforge"]["restarts"] == 0
        events = client.fine_tuning.jobs.list_events(job.id, limit=200).data
        assert not [e for e in events if e.data and e.data.get("kind") == "restart"]
    finally:
        server.stop()
