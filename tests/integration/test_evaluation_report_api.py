"""A job's evaluation report through the API: a real job (tiny model, real worker and recipe) writes
DIR/evaluation.json; GET /v1/fine_tuning/jobs/{id}/evaluation answers 404 in the API's error shape until
then, and afterwards the typed report (every metric with its sample size and interval, the samples side
by side), the same as the file (sealed at rest once the job has ended: read back through the job's key);
the human evaluation exports those samples.

SQLite only: the database part is the tenant-scoped job lookup every job route shares.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, post_file, wait_validated

from tuneforge.spec.jobdir import EvaluationReport

JOB = {
    "training": {"max_steps": 2, "per_device_batch_size": 4},
    "dataset": {"max_seq_length": 256},
    "evaluation": {"metrics": ["loss", "exact_match", "json_valid"], "max_eval_examples": 4, "max_new_tokens": 8,
                   "report_samples": 3},
    "checkpoint": {"every_steps": None},
}


def sealed_report(server: ServerProcess, job_id: str) -> EvaluationReport:
    """DIR/evaluation.json as the worker left it: sealed at rest (no plaintext copy), opened with the job's key."""
    from pathlib import Path

    from tuneforge.db.session import Database
    from tuneforge.registry.storage import job_files
    from tuneforge.registry.storage.keys import FolderKeyProvider

    job_dir = server.home / "jobs" / job_id
    deadline = time.monotonic() + 60  # the worker seals right after the success is committed
    while not (job_dir / "evaluation.json.tfe").is_file():
        assert time.monotonic() < deadline, "the evaluation report was not sealed at rest"
        time.sleep(0.2)
    assert not (job_dir / "evaluation.json").exists()
    db = Database(server.env["TUNEFORGE_DATABASE_URL"])
    try:
        with db.read_session() as session:
            data = job_files.read_job_file(session, FolderKeyProvider(Path(server.home) / "keys"), tenant_id="tenant-a",
                                           job_id=job_id, job_dir=job_dir, relative="evaluation.json")
    finally:
        db.dispose()
    return EvaluationReport.model_validate_json(data)


@pytest.fixture
def server(tmp_path):
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'tuneforge.db'}")
    yield process
    process.stop()


def test_the_report_of_a_finished_job_is_served_typed_and_404_before(server):
    a = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['tenant-a']}"}, timeout=30)
    training = wait_validated(a, post_file(a, EXAMPLE_DATA / "train.jsonl")["id"])
    validation = wait_validated(a, post_file(a, EXAMPLE_DATA / "val.jsonl")["id"])
    created = a.post("/v1/fine_tuning/jobs", json={"model": "tiny-llama", "training_file": training["id"],
                                                   "validation_file": validation["id"], "tuneforge": JOB})
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    early = a.get(f"/v1/fine_tuning/jobs/{job_id}/evaluation")
    assert early.status_code == 404
    assert early.json()["error"]["code"] == "not_found" and early.json()["error"]["param"] == "fine_tuning_job_id"

    deadline = time.monotonic() + 300
    while (status := a.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]) not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, server.log_text()[-3000:]
        time.sleep(0.5)
    assert status == "succeeded", server.log_text()[-3000:]

    served = a.get(f"/v1/fine_tuning/jobs/{job_id}/evaluation")
    assert served.status_code == 200, served.text
    report = EvaluationReport.model_validate(served.json())
    on_disk = sealed_report(server, job_id)
    assert str(server.home) in on_disk.dataset and str(server.home) not in served.text  # no server path leaves
    named = {"dataset": validation["id"], "base_model": "tiny-llama",
             "fine_tuned_model": a.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]}
    assert report.fine_tuned_model.startswith("ft:tiny-llama:")
    assert report == on_disk.model_copy(update=named)
    rows = {row.metric: row for row in report.rows}
    assert set(rows) == {"loss", "token_accuracy", "exact_match", "json_valid"}  # token accuracy comes with loss
    for name in ("exact_match", "json_valid"):
        for side in (rows[name].base, rows[name].fine_tuned):
            assert side.n == 4 and side.interval == "wilson" and side.low <= side.value <= side.high
    assert rows["loss"].fine_tuned.interval == "bootstrap" and rows["loss"].fine_tuned.tokens > 0
    assert rows["loss"].fine_tuned.value < rows["loss"].base.value  # it trained
    assert len(report.samples) == 3 and all(s.base is not None and s.fine_tuned is not None for s in report.samples)

    # Another tenant's key: the same 404 as a job that does not exist.
    b = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['tenant-b']}"}, timeout=30)
    assert b.get(f"/v1/fine_tuning/jobs/{job_id}/evaluation").json()["error"]["message"] == \
        f"No fine-tuning job found with id {job_id!r}"

    # The human evaluation exports the report's samples.
    human = a.post(f"/v1/fine_tuning/jobs/{job_id}/human_eval")
    assert human.status_code == 200 and human.json()["rows"] == 3
    exported = [json.loads(line) for line in a.get(f"/v1/fine_tuning/jobs/{job_id}/human_eval/rows").text.splitlines()]
    assert sorted((r["left"], r["right"]) in ((s.base, s.fine_tuned), (s.fine_tuned, s.base))
                  for r in exported for s in report.samples if r["prompt"] in s.prompt).count(True) >= 3
