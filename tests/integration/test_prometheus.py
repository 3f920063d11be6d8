"""Prometheus /metrics, /healthz and /readyz, and the no-progress alert: the scrape's database gauges on SQLite
and PostgreSQL (jobs by status, queue, slots, a running job's throughput and firing alerts, heartbeats), the
worker's stall check failing a job that asked for it, /readyz refusing an unmigrated database; and a real
`tuneforge server` with a training job watched through /metrics while its recipe is frozen and thawed."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, post_file, wait_validated
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tuneforge.api.app import create_app
from tuneforge.api.health import migration_head
from tuneforge.api.metrics import DatabaseCollector, exposition
from tuneforge.db import jobs as job_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db import workers as worker_rows
from tuneforge.db.job_events import ingest, list_events
from tuneforge.db.migrate import downgrade, upgrade
from tuneforge.db.monitoring import snapshot
from tuneforge.db.session import Database
from tuneforge.scheduler import states
from tuneforge.scheduler.placement import Node
from tuneforge.scheduler.queue import claim_next
from tuneforge.scheduler.stalls import record_stall
from tuneforge.settings import Settings
from tuneforge.spec import validate_job_spec
from tuneforge.spec.monitoring import NoProgressAlert, alert_event


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    upgrade(database.engine)
    yield database
    database.dispose()


def samples(text: str) -> dict[tuple, float]:
    """{(name, sorted labels...): value} of a text exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return found


def queued_job(db: Database) -> str:
    spec = validate_job_spec({"dataset": {"path": "file-x"}, "resources": {"num_gpus": 2}})
    with db.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id="t")
        job = job_rows.create_job(session, tenant_id="t", spec=spec, model="tiny-llama", training_file="file-x",
                                  validation_file=None, suffix=None, metadata=None)
        assert states.admit(session, job_id=job.id)
        return job.id


def event(data: dict, *, type: str = "message", message: str = "", age_s: float = 0) -> dict:
    return {"id": f"ftevent-{os.urandom(8).hex()}", "created_at": int(time.time() - age_s), "type": type,
            "message": message or f"alert {data.get('alert')}", "data": data}


def test_the_scrape_reads_jobs_queue_slots_throughput_alerts_and_heartbeats(db):
    waiting, running = queued_job(db), queued_job(db)
    with db.session() as session:
        claimed = claim_next(session, worker_id="w1", nodes=[Node("cpu", 2)], free=[2], lease_seconds=60,
                             now_s=time.time())
        worker_rows.register_worker(session, worker_id="w1", hostname="h", executor="local",
                                    inventory=[{"gpu_type": "cpu", "gpus": 2}, {"gpu_type": "cpu", "gpus": 6}])
    assert claimed.job_id == waiting  # the older job starts; `running` waits
    running, waiting = waiting, running
    events = [
        event({"step": 1, "train_loss": 2.0, "tokens_per_second": 900.0, "mfu": 0.21}, type="metrics"),
        event({"step": 2, "valid_loss": 1.9}, type="metrics"),  # a validation row: no throughput, the step's is kept
        event(alert_event("loss_divergence", stop_job=False, step=2, state="firing")),
        event(alert_event("eval_worse", stop_job=False, step=2, state="firing")),
        event(alert_event("eval_worse", stop_job=False, step=4, state="resolved")),
        event(alert_event("loss_nan", stop_job=False, step=9, state="firing"), age_s=3600),  # an earlier attempt's
    ]
    with db.session() as session:
        assert ingest(session, job_id=running, attempt=claimed.attempt, worker_id="w1", events=events, offset=1)
        snap = snapshot(session, seen_within_s=600)
    assert snap.jobs_by_status == {"queued": 1, "running": 1} and snap.queued == 1
    assert 0 <= snap.oldest_queued_wait_s < 120 and snap.gpu_slots == 8 and list(snap.workers) == ["w1"]
    (job,) = snap.running
    assert (job.job_id, job.gpus, job.tokens_per_second, job.mfu, job.firing) == (running, 2, 900.0, 0.21,
                                                                                 {"loss_divergence"})

    scraped = samples(exposition(db).decode())
    assert scraped[("tuneforge_database_up",)] == 1
    assert scraped[("tuneforge_jobs", ("status", "running"))] == 1 and scraped[("tuneforge_queue_length",)] == 1
    assert scraped[("tuneforge_gpu_slots",)] == 8 and scraped[("tuneforge_gpu_slots_used",)] == 2
    assert scraped[("tuneforge_job_tokens_per_second", ("job_id", running))] == 900.0
    assert scraped[("tuneforge_job_mfu_ratio", ("job_id", running))] == 0.21
    assert scraped[("tuneforge_job_alert_firing", ("alert", "loss_divergence"), ("job_id", running))] == 1
    assert scraped[("tuneforge_alerts_firing", ("alert", "loss_divergence"))] == 1
    assert not any(key[0] == "tuneforge_job_alert_firing" and ("alert", "eval_worse") in key for key in scraped)
    assert 0 <= scraped[("tuneforge_worker_heartbeat_age_seconds", ("worker", "w1"))] < 60
    assert not any("tenant" in label for key in scraped for label, _ in key[1:])  # never a tenant label

    # The worker's no-progress check with stop_job: an alert event, and the job fails with it as its error.
    with db.session() as session:
        record_stall(session, job_id=running, attempt=claimed.attempt, rule=NoProgressAlert(minutes=5, stop_job=True),
                     step=1)
    with db.session() as session:
        row = job_rows.get_job_any_tenant(session, job_id=running)
        assert row.status == "failed" and row.error["code"] == "no_progress"
        assert "no optimizer step reported for 5 minutes (last step 1)" in row.error["message"]
        kinds = [(e.data or {}).get("alert") for e in list_events(session, job_id=running, limit=50)[0]]
        assert "no_progress" in kinds
    scraped = samples(exposition(db).decode())
    assert not any(key[0] == "tuneforge_job_tokens_per_second" for key in scraped)  # only running jobs have series
    assert scraped[("tuneforge_jobs", ("status", "failed"))] == 1


def test_metrics_needs_an_admin_key_times_requests_by_route_and_readyz_checks_the_schema(tmp_path):
    gone = Database(f"sqlite:///{tmp_path / 'missing' / 'no.db'}")
    families = list(DatabaseCollector(gone).collect())
    assert [(f.name, f.samples[0].value) for f in families] == [("tuneforge_database_up", 0)]

    url = f"sqlite:///{tmp_path / 'tuneforge.db'}"
    db = Database(url)
    upgrade(db.engine)
    with db.session() as session:
        admin = tenant_rows.create_api_key(session, tenant_id="default", admin=True)[1]
        tenant = tenant_rows.create_api_key(session, tenant_id="tenant-a")[1]
    settings = Settings.from_env(database_url=url, artifacts_dir=tmp_path / "artifacts", jobs_dir=tmp_path / "jobs")
    with TestClient(create_app(settings, db=db)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready", "database": "ok", "migration": migration_head()}
        assert client.get("/metrics").status_code == 401
        refused = client.get("/metrics", headers={"Authorization": f"Bearer {tenant}"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope"
        client.get("/v1/fine_tuning/jobs/ftjob-000000000000000000000000", headers={"Authorization": f"Bearer {tenant}"})
        answer = client.get("/metrics", headers={"Authorization": f"Bearer {admin}"})
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
        scraped = samples(answer.text)
        assert scraped[("tuneforge_database_up",)] == 1 and scraped[("tuneforge_queue_length",)] == 0
        count = ("tuneforge_http_request_duration_seconds_count", ("method", "GET"),
                 ("route", "/v1/fine_tuning/jobs/{job_id}"), ("status", "404"))
        assert scraped[count] >= 1  # by route template: an id never becomes a label
        assert scraped[("tuneforge_http_request_duration_seconds_count", ("method", "GET"), ("route", "/metrics"),
                        ("status", "401"))] >= 1
        assert not any(ftjob in str(key) for key in scraped for ftjob in ("ftjob-0000",))

        downgrade(db.engine, "-1")  # a schema one migration behind this code
        answer = client.get("/readyz")
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "migrations_pending"
        assert f"this server needs {migration_head()}" in answer.json()["error"]["message"]
        upgrade(db.engine)
        assert client.get("/readyz").status_code == 200
    db.dispose()


def recipe_process(server: ServerProcess) -> psutil.Process:
    for child in psutil.Process(server.process.pid).children(recursive=True):
        if any("tuneforge.recipes." in part for part in child.cmdline()):
            return child
    raise AssertionError("no recipe process under the server")


def wait_for(predicate, *, timeout: float, what: str, server: ServerProcess):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{server.log_text()[-3000:]}")


@pytest.mark.slow  # a real server, a training job and a frozen recipe: ~40 s on a quiet 2-core machine
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_running_job_seen_through_metrics_while_its_recipe_freezes_and_thaws(tmp_path, database_url):
    (tmp_path / "home").mkdir()
    server = ServerProcess(tmp_path / "home", database_url)
    try:
        admin_key = (tmp_path / "home" / "admin-key").read_text().strip()
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['tenant-a']}"},
                            timeout=30)
        assert http.get("/healthz").status_code == 200 and http.get("/readyz").json()["status"] == "ready"
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert http.get("/metrics").json()["error"]["code"] == "insufficient_scope"  # a tenant's key is not enough

        def scrape() -> dict:
            answer = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
            assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
            return samples(answer.text)

        training = wait_validated(http, post_file(http, EXAMPLE_DATA / "train.jsonl")["id"])
        validation = wait_validated(http, post_file(http, EXAMPLE_DATA / "val.jsonl")["id"])
        created = http.post("/v1/fine_tuning/jobs", json={
            "model": "tiny-llama", "training_file": training["id"], "validation_file": validation["id"],
            "tuneforge": {"training": {"max_steps": 2000, "per_device_batch_size": 2}, "dataset": {"max_seq_length": 256},
                          "evaluation": {"max_eval_examples": 2, "eval_every_steps": 2, "eval_before_training": False},
                          "checkpoint": {"every_steps": 1000},
                          # max on a falling loss: fires at the second validation, deterministically
                          "monitoring": {"peak_flops": 1e11, "sample_interval_s": 0.5, "alerts": {
                              "eval_worse": {"enabled": True, "direction": "max", "evaluations": 1},
                              "no_progress": {"minutes": 0.1}}}}})
        assert created.status_code == 200, created.text
        job_id = created.json()["id"]

        key = ("tuneforge_job_alert_firing", ("alert", "eval_worse"), ("job_id", job_id))
        scraped = wait_for(lambda: (s := scrape()).get(key) and s, timeout=240, what="the eval_worse alert", server=server)
        assert scraped[("tuneforge_jobs", ("status", "running"))] == 1 and scraped[("tuneforge_gpu_slots_used",)] == 1
        assert scraped[("tuneforge_job_tokens_per_second", ("job_id", job_id))] > 0
        assert 0 < scraped[("tuneforge_job_mfu_ratio", ("job_id", job_id))] < 1
        assert scraped[("tuneforge_workers",)] == 1 and scraped[("tuneforge_gpu_slots",)] == 1
        assert scraped[("tuneforge_http_request_duration_seconds_count", ("method", "POST"),
                        ("route", "/v1/fine_tuning/jobs"), ("status", "200"))] == 1
        assert ("tuneforge_http_request_duration_seconds_bucket", ("le", "+Inf"), ("method", "GET"),
                ("route", "/v1/files/{file_id}"), ("status", "200")) in scraped  # templates, not ids

        def alerts() -> list[dict]:
            data = http.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
            return [e["data"] for e in reversed(data) if (e.get("data") or {}).get("alert") == "no_progress"]

        before = len(alerts())
        recipe = recipe_process(server)
        recipe.send_signal(signal.SIGSTOP)  # a hung recipe: alive, silent
        try:
            fired = wait_for(lambda: [a for a in alerts()[before:] if a["state"] == "firing"], timeout=60,
                             what="the no_progress alert", server=server)
            assert fired[0]["stop_job"] is False and fired[0]["minutes"] == 0.1
            assert scrape()[("tuneforge_alerts_firing", ("alert", "no_progress"))] == 1
        finally:
            recipe.send_signal(signal.SIGCONT)
        wait_for(lambda: [a for a in alerts()[before:] if a["state"] == "resolved"], timeout=60,
                 what="the no_progress alert to clear", server=server)
        assert http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "running"  # an alert only: no stop

        assert http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
        wait_for(lambda: scrape().get(("tuneforge_jobs", ("status", "cancelled"))) == 1, timeout=120,
                 what="the cancel", server=server)
        assert not any(key[0] == "tuneforge_job_tokens_per_second" for key in scrape())
    finally:
        server.stop()


def test_the_worker_fires_and_clears_no_progress_and_reports_its_reporters(db, tmp_path):
    from tuneforge.scheduler.admission import live_inventories
    from tuneforge.scheduler.executors.local import LocalExecutor
    from tuneforge.scheduler.worker import Attempt, Worker

    job_id = queued_job(db)
    with db.session() as session:
        claimed = claim_next(session, worker_id="w", nodes=[Node("cpu", 2)], free=[2], lease_seconds=60,
                             now_s=time.time())
    worker = Worker(db, Settings.from_env(database_url=db.url), LocalExecutor(cpu_slots=2), worker_id="w")
    worker.run_once()  # announces its inventory (and tends nothing: the attempt below is not its own launch)
    with db.session() as session:
        (node,) = live_inventories(session)[0]["nodes"]
    assert sorted(node["reporters"]) == ["mlflow", "tensorboard", "wandb"]

    spec = validate_job_spec({"dataset": {"path": "file-x"}, "monitoring": {"alerts": {"no_progress": {"minutes": 5}}}})
    now = time.time()
    attempt = Attempt(job_id=job_id, tenant_id="t", attempt=claimed.attempt, spec=spec, job_dir=tmp_path,
                      nodes=claimed.nodes, gpus=2, started=now, last_renewal=now, last_progress=now - 200)
    worker._watch_progress(attempt, now)
    assert not attempt.stalled  # 200 s < 5 minutes
    worker._watch_progress(attempt, now + 200)
    worker._watch_progress(attempt, now + 260)  # still stalled: no second event
    attempt.last_progress = now + 270  # a step arrived
    worker._watch_progress(attempt, now + 271)
    with db.session() as session:
        alerts = [e.data for e in reversed(list_events(session, job_id=job_id, limit=50)[0])
                  if (e.data or {}).get("alert") == "no_progress"]
        assert job_rows.get_job_any_tenant(session, job_id=job_id).status == "running"  # stop_job is off
    assert [a["state"] for a in alerts] == ["firing", "resolved"] and alerts[0]["minutes"] == 5
