"""Cost end to end: usage records split by UTC day and budgets on SQLite and PostgreSQL; an eval run priced
at creation and refused over its tenant's budget (in process); then a real `tuneforge server` with its worker
prices a job at creation and in /jobs/plan, refuses jobs over their own or their tenant's budget, stops a
running job at a checkpoint when its tenant's budget is spent, and records each finished job's actual cost,
overhead and estimate error, reported by day as JSON and CSV."""

from __future__ import annotations

import csv
import datetime as dt
import io
import time

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, post_file, wait_validated

from tuneforge.db import costs as cost_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.planner.cost import DEFAULT_PRICES
from tuneforge.scheduler import cost
from tuneforge.spec import validate_job_spec

CPU_PRICE = DEFAULT_PRICES["cpu"][0]


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    upgrade(database.engine)
    yield database
    database.dispose()


def new_job(session, tenant: str, **resources) -> str:
    tenant_rows.ensure_tenant(session, tenant_id=tenant)
    spec = validate_job_spec({"dataset": {"path": "file-x"}, "resources": {"gpu_type": "cpu", **resources}})
    job = job_rows.create_job(session, tenant_id=tenant, spec=spec, model="tiny-llama", training_file="file-x",
                              validation_file=None, suffix=None, metadata=None)
    return job.id


def test_usage_is_split_by_utc_day_and_spends_job_and_tenant_budgets(db):
    midnight = dt.datetime(2026, 11, 30, tzinfo=dt.timezone.utc).timestamp() + 86400  # 2026-12-01 00:00 UTC
    with db.session() as session:
        job_id = new_job(session, "acme", num_gpus=2, max_gpu_hours=3.0)
        other = new_job(session, "other")
        # 30 min before midnight to 90 min after, on 2 processes: 1 + 3 device-hours.
        cost.record_usage(session, job_id=job_id, tenant_id="acme", device="cpu", devices=2,
                          start_s=midnight - 1800, end_s=midnight + 5400)
        cost.record_usage(session, job_id=other, tenant_id="other", device="cpu", devices=1,
                          start_s=midnight, end_s=midnight + 3600)
    with db.read_session() as session:
        days = cost_rows.usage_by_period(session, tenant_id="acme", period="day")
        assert [(d, round(s / 3600, 6), round(c, 6), n) for _, d, s, c, n in days] == [
            ("2026-11-30", 1.0, round(CPU_PRICE, 6), 1), ("2026-12-01", 3.0, round(3 * CPU_PRICE, 6), 1)]
        months = cost_rows.usage_by_period(session, tenant_id=None, period="month")
        assert [(t, m, round(s / 3600, 6)) for t, m, s, _, _ in months] == [
            ("acme", "2026-11", 1.0), ("acme", "2026-12", 3.0), ("other", "2026-12", 1.0)]
        spec = validate_job_spec({"dataset": {"path": "file-x"}, "resources": {"max_gpu_hours": 3.0}})
        # The job's own budget counts its whole life; the tenant's only this month.
        assert "max_gpu_hours is 3" in cost.running_budget_problem(session, job_id=job_id, tenant_id="acme", spec=spec,
                                                                   now_s=midnight + 5400)
    with db.session() as session:
        cost_rows.set_budget(session, tenant_id="acme", monthly_cost_usd=None, monthly_gpu_hours=3.5)
    with db.read_session() as session:
        roomy = validate_job_spec({"dataset": {"path": "file-x"}})
        assert cost.running_budget_problem(session, job_id=job_id, tenant_id="acme", spec=roomy,
                                           now_s=midnight + 5400) is None
        assert cost.tenant_budget_problem(session, tenant_id="acme", estimate=None, now_s=midnight + 5400) is None
        # November's hour is not December's: 3 of 3.5 used, so an estimate of 1 GPU-hour does not fit.
        plan_estimate = type("E", (), {"cost_usd": 0.05, "gpu_hours": 1.0})()
        problem = cost.tenant_budget_problem(session, tenant_id="acme", estimate=plan_estimate, now_s=midnight + 5400)
        assert "has used 3.0000 of its 3.5 GPU-hours for 2026-12" in problem
        assert cost.tenant_budget_problem(session, tenant_id="other", estimate=plan_estimate, now_s=midnight) is None


def test_an_eval_run_is_priced_when_created_and_refused_over_its_tenants_budget(db, database_url):
    from fastapi.testclient import TestClient

    from tuneforge.api.app import create_app
    from tuneforge.settings import Settings

    with db.session() as session:
        secret = tenant_rows.create_api_key(session, tenant_id="tenant-a")[1]
    with TestClient(create_app(Settings.from_env(database_url=database_url), db=db)) as a:
        a.headers["Authorization"] = f"Bearer {secret}"
        evaluation = a.post("/v1/evals", json={
            "data_source_config": {"type": "custom", "item_schema": {"type": "object"}},
            "testing_criteria": [{"type": "string_check", "name": "exact", "operation": "eq",
                                  "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}]}).json()

        def run(max_completion_tokens: int, items: int = 8):
            return a.post(f"/v1/evals/{evaluation['id']}/runs", json={"data_source": {
                "type": "completions", "model": "smollm2-135m-instruct",
                "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]},
                "sampling_params": {"max_completion_tokens": max_completion_tokens},
                "source": {"type": "file_content", "content": [{"item": {"question": f"{i} + {i}?", "answer": str(2 * i)}}
                                                               for i in range(items)]}}})

        short = run(16).json()["tuneforge"]["cost"]
        assert short["estimated_gpu_hours"] > 0 and "the model: 8 prompts of ~" in short["estimate_basis"]
        assert short["estimated_cost_usd"] == pytest.approx(
            short["estimated_gpu_hours"] * short["price_per_gpu_hour"], rel=1e-3)
        assert (short["gpu_hours"], short["final"]) == (0.0, False)  # nothing ran: no worker here
        longer = run(1024).json()["tuneforge"]["cost"]
        assert longer["estimated_wall_seconds"] > short["estimated_wall_seconds"]  # decoding is priced
        # A jsonl run grades the samples its items carry: no model, nothing to price.
        jsonl = a.post(f"/v1/evals/{evaluation['id']}/runs", json={"data_source": {"type": "jsonl", "source": {
            "type": "file_content", "content": [{"item": {"answer": "4"}, "sample": {"output_text": "4"}}]}}}).json()
        assert jsonl["tuneforge"]["cost"]["estimated_gpu_hours"] is None

        # The tenant's monthly budget takes what it has spent (nothing) plus the run's estimate.
        with db.session() as session:
            cost_rows.set_budget(session, tenant_id="tenant-a", monthly_cost_usd=None,
                                 monthly_gpu_hours=(short["estimated_gpu_hours"] + longer["estimated_gpu_hours"]) / 2)
        assert run(16).status_code == 200
        refused = run(1024)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded", refused.text
        assert "this job is estimated at" in refused.json()["error"]["message"]


# ---- against a real server ---------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path):
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'tuneforge.db'}")
    yield process
    process.stop()


def http_for(server: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def job_body(training_file: str, **tuneforge) -> dict:
    sections = {"dataset": {"max_seq_length": 256}, "evaluation": {"max_eval_examples": 2, "eval_before_training": False},
                **tuneforge}
    return {"model": "tiny-llama", "training_file": training_file, "tuneforge": sections}


def wait_for(predicate, what: str, server: ServerProcess, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{server.log_text()[-4000:]}")


@pytest.fixture
def api_server(tmp_path):
    (tmp_path / "home").mkdir()
    process = ServerProcess(tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'tuneforge.db'}", worker=False)
    yield process
    process.stop()


def test_the_api_prices_jobs_refuses_them_over_budget_and_reports_usage_as_json_and_csv(api_server):
    server = api_server
    a, b = http_for(server, server.keys["tenant-a"]), http_for(server, server.keys["tenant-b"])
    admin = http_for(server, (server.home / "admin-key").read_text().strip())
    training = wait_validated(a, post_file(a, EXAMPLE_DATA / "train.jsonl")["id"])["id"]
    body = job_body(training, training={"max_steps": 10, "batch_size": 4}, resources={"gpu_type": "l4"})
    plan = a.post("/v1/fine_tuning/jobs/plan", json=body).json()["cost"]
    assert plan["device"] == "l4" and plan["price_per_gpu_hour"] == DEFAULT_PRICES["l4"][0]
    assert "10 steps x 4 packed rows" in plan["basis"] and plan["tokens"] > 0  # tiny-llama packs: rows of examples
    assert plan["cost_usd"] == pytest.approx(plan["gpu_hours"] * DEFAULT_PRICES["l4"][0])
    over = a.post("/v1/fine_tuning/jobs", json={**body, "tuneforge": {**body["tuneforge"], "resources": {
        "gpu_type": "l4", "max_gpu_hours": plan["gpu_hours"] / 2}}})
    assert over.status_code == 400 and over.json()["error"]["code"] == "over_job_budget", over.text
    assert over.json()["error"]["param"] == "tuneforge.resources.max_gpu_hours"
    assert a.get("/v1/fine_tuning/jobs").json()["data"] == []

    job = a.post("/v1/fine_tuning/jobs", json=body).json()
    cost_now = job["tuneforge"]["cost"]
    assert cost_now["estimated_gpu_hours"] == pytest.approx(plan["gpu_hours"], rel=1e-4) and cost_now["gpu_hours"] == 0
    assert job["estimated_finish"] == pytest.approx(job["created_at"] + plan["wall_seconds"], abs=1)
    # What a worker records while the job runs (two hours on an L4) shows on the job and in the usage.
    database = Database(f"sqlite:///{server.home / 'tuneforge.db'}")
    with database.session() as session:
        cost.record_usage(session, job_id=job["id"], tenant_id="tenant-a", device="l4", devices=1,
                          start_s=time.time() - 7200, end_s=time.time())
    database.dispose()
    live = a.get(f"/v1/fine_tuning/jobs/{job['id']}").json()["tuneforge"]["cost"]
    assert live["gpu_hours"] == pytest.approx(2.0, rel=1e-3) and not live["final"]
    assert live["cost_usd"] == pytest.approx(2 * DEFAULT_PRICES["l4"][0], rel=1e-3)
    rows = a.get("/v1/tuneforge/usage/costs", params={"period": "month"}).json()
    assert [r["tenant"] for r in rows["data"]] == ["tenant-a"] and rows["gpu_hours"] == pytest.approx(2.0, rel=1e-3)
    assert b.get("/v1/tuneforge/usage/costs").json()["data"] == []  # another tenant's usage is not B's
    exported = a.get("/v1/tuneforge/usage/costs", params={"format": "csv"})
    assert exported.headers["content-type"].startswith("text/csv")
    assert exported.text.splitlines()[0] == "tenant,period,gpu_hours,cost_usd,jobs"
    assert sum(float(r["gpu_hours"]) for r in csv.DictReader(io.StringIO(exported.text))) == pytest.approx(2.0, rel=1e-3)
    assert sorted({r["tenant"] for r in admin.get("/v1/tuneforge/admin/costs").json()["data"]}) == ["tenant-a"]
    assert a.get("/v1/tuneforge/admin/costs").status_code == 403

    # A monthly budget the month's usage has spent: the next job is a 429, as the other quotas answer.
    assert a.put("/v1/tuneforge/tenants/tenant-a/budget", json={"monthly_cost_usd": 1}).status_code == 403
    budget = admin.put("/v1/tuneforge/tenants/tenant-a/budget", json={"monthly_cost_usd": 1.0}).json()
    assert budget["cost_usd"] == pytest.approx(2 * DEFAULT_PRICES["l4"][0], rel=1e-3)
    refused = a.post("/v1/fine_tuning/jobs", json=body)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "budget_exceeded", refused.text
    assert "budget for" in refused.json()["error"]["message"]
    assert admin.get("/v1/tuneforge/tenants/no-such/budget").status_code == 404
    assert b.post("/v1/fine_tuning/jobs", json={**body, "training_file": wait_validated(
        b, post_file(b, EXAMPLE_DATA / "train.jsonl")["id"])["id"]}).status_code == 200  # B's budget is its own
    prices = {p["device"]: p for p in a.get("/v1/tuneforge/prices").json()["data"]}
    assert set(prices) == set(DEFAULT_PRICES) and prices["l4"]["source"] == "default"


@pytest.mark.slow  # two training runs on the tiny model: ~40 s on an idle machine, minutes on a loaded one
def test_jobs_are_priced_refused_over_budget_stopped_when_it_is_spent_and_their_cost_recorded(server):
    a, b = http_for(server, server.keys["tenant-a"]), http_for(server, server.keys["tenant-b"])
    admin = http_for(server, (server.home / "admin-key").read_text().strip())
    file_a = wait_validated(a, post_file(a, EXAMPLE_DATA / "train.jsonl")["id"])["id"]
    file_b = wait_validated(b, post_file(b, EXAMPLE_DATA / "train.jsonl")["id"])["id"]

    # The plan and the created job carry the same estimate, priced on the worker's device (cpu here).
    short = job_body(file_a, training={"max_steps": 3, "per_device_batch_size": 2, "batch_size": 2})
    plan = a.post("/v1/fine_tuning/jobs/plan", json=short).json()
    assert plan["cost"]["device"] == "cpu" and plan["cost"]["price_per_gpu_hour"] == CPU_PRICE
    assert plan["cost"]["tokens"] > 0 and "3 steps x 2 packed rows" in plan["cost"]["basis"]  # tiny-llama packs
    # A job whose estimate is over its own budget is refused before it exists.
    over = job_body(file_a, training={"max_steps": 3}, resources={"max_cost_usd": 1e-9})
    refused = a.post("/v1/fine_tuning/jobs", json=over)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["code"] == "over_job_budget"
    assert refused.json()["error"]["param"] == "tuneforge.resources.max_cost_usd"
    assert a.get("/v1/fine_tuning/jobs").json()["data"] == []

    # Tenant B's long job is stopped at a checkpoint once its tenant's monthly GPU-hours are spent.
    long = job_body(file_b, training={"max_steps": 400, "per_device_batch_size": 2, "batch_size": 2},
                    checkpoint={"every_steps": 2})
    stopped = b.post("/v1/fine_tuning/jobs", json=long).json()
    assert stopped["estimated_finish"] >= stopped["created_at"]
    wait_for(lambda: b.get(f"/v1/fine_tuning/jobs/{stopped['id']}/checkpoints").json()["data"], "a checkpoint", server)
    budget = admin.put("/v1/tuneforge/tenants/tenant-b/budget", json={"monthly_gpu_hours": 1e-6})
    assert budget.status_code == 200 and budget.json()["monthly_gpu_hours"] == 1e-6
    done = wait_for(lambda: (j := b.get(f"/v1/fine_tuning/jobs/{stopped['id']}").json())["status"] == "failed" and j,
                    "the budget stop", server)
    assert done["error"]["code"] == "budget_exceeded" and "GPU-hours" in done["error"]["message"]
    events = [e["data"] or {} for e in b.get(f"/v1/fine_tuning/jobs/{stopped['id']}/events?limit=1000").json()["data"]]
    assert any(e.get("kind") == "budget" for e in events)
    assert any(e.get("status") == "preempted" for e in events)  # the recipe checkpointed on its way out
    assert done["tuneforge"]["cost"]["final"] and done["tuneforge"]["cost"]["gpu_hours"] > 0
    # ... and the tenant's next job is refused with the quota's 429.
    again = b.post("/v1/fine_tuning/jobs", json=long)
    assert again.status_code == 429 and again.json()["error"]["code"] == "budget_exceeded", again.text

    # Tenant A's short job runs to the end: its estimate, then its actual cost, overhead and error.
    created = a.post("/v1/fine_tuning/jobs", json=short).json()
    estimate = created["tuneforge"]["cost"]
    assert estimate["estimated_gpu_hours"] == pytest.approx(plan["cost"]["gpu_hours"], rel=1e-3)
    assert estimate["estimated_cost_usd"] == pytest.approx(estimate["estimated_gpu_hours"] * CPU_PRICE, rel=1e-3)
    assert created["estimated_finish"] is not None and not estimate["final"]
    job = wait_for(lambda: (j := a.get(f"/v1/fine_tuning/jobs/{created['id']}").json())["status"] == "succeeded" and j,
                   "the job to succeed", server)
    actual = job["tuneforge"]["cost"]
    assert actual["final"] and job["estimated_finish"] is None
    # The scheduler's accounting (gpu_seconds) and the priced usage records agree.
    assert actual["gpu_hours"] == pytest.approx(job["tuneforge"]["gpu_seconds"] / 3600, rel=0.02)
    assert actual["cost_usd"] == pytest.approx(actual["gpu_hours"] * CPU_PRICE, rel=1e-3)
    assert 0 < actual["overhead_fraction"] < 1
    assert actual["estimate_error"] == pytest.approx(
        (actual["estimated_gpu_hours"] - actual["gpu_hours"]) / actual["gpu_hours"], abs=1e-3)

    # Usage by day: each tenant sees its own, admins everyone's, as JSON and CSV.
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    mine = a.get("/v1/tuneforge/usage/costs").json()
    assert [(r["tenant"], r["period"], r["jobs"]) for r in mine["data"]] == [("tenant-a", today, 1)]
    assert mine["gpu_hours"] == pytest.approx(actual["gpu_hours"], rel=0.01)
    assert mine["budget"]["monthly_cost_usd"] is None
    monthly = b.get("/v1/tuneforge/usage/costs", params={"period": "month"}).json()
    assert [r["tenant"] for r in monthly["data"]] == ["tenant-b"] and monthly["budget"]["monthly_gpu_hours"] == 1e-6
    exported = a.get("/v1/tuneforge/usage/costs", params={"format": "csv"})
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(r["tenant"], r["period"]) for r in rows] == [("tenant-a", today)]
    everyone = admin.get("/v1/tuneforge/admin/costs").json()["data"]
    assert sorted(r["tenant"] for r in everyone) == ["tenant-a", "tenant-b"]
    assert a.get("/v1/tuneforge/admin/costs").status_code == 403
    assert a.put("/v1/tuneforge/tenants/tenant-a/budget", json={"monthly_cost_usd": 5}).status_code == 403
    prices = {p["device"]: p for p in a.get("/v1/tuneforge/prices").json()["data"]}
    assert prices["cpu"]["price_per_hour"] == CPU_PRICE and set(prices) == set(DEFAULT_PRICES)
