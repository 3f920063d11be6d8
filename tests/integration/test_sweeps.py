"""Sweeps: the driver against a real database (SQLite and PostgreSQL) with the scheduler's own claim, ingest
and state functions playing the worker (fast, default suite); and end to end against a real `tuneforge
server` on the tiny model (slow): trials train, a pruned trial stops early and frees its slot, the sweep
survives the server being killed, and the best trial is the registry's `best` version."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from conftest import EXAMPLE_DATA, ServerProcess, post_file, wait_validated

from tuneforge.db import files as file_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import sweeps as sweep_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db import workers as worker_rows
from tuneforge.db.job_events import ingest
from tuneforge.db.migrate import upgrade
from tuneforge.db.session import Database
from tuneforge.registry.datasets import inspect_dataset
from tuneforge.scheduler import states
from tuneforge.scheduler.placement import Node
from tuneforge.scheduler.queue import claim_next
from tuneforge.scheduler.sweeps import SweepDriver, cancel_sweep, sweep_object
from tuneforge.settings import Settings
from tuneforge.spec.sweep import validate_sweep_spec

TENANT = "t"
WORKER = "w-test"


@pytest.fixture
def pg_and_sqlite_db(database_url):
    yield from _database(database_url)


@pytest.fixture
def db(tmp_path):
    """SQLite only: the grid test runs on both databases, the rest of the driver's logic is the same SQL."""
    yield from _database(f"sqlite:///{tmp_path / 'tuneforge.db'}")


def _database(url: str):
    database = Database(url)
    upgrade(database.engine)
    with database.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id=TENANT)
        worker_rows.register_worker(session, worker_id=WORKER, hostname="h", executor="local",
                                    inventory=[{"gpu_type": "cpu", "gpus": 8, "strategies": ["ddp"]}])
    yield database
    database.dispose()


def training_file(db: Database) -> str:
    path = EXAMPLE_DATA / "train.jsonl"
    report = inspect_dataset(path, display_name=path.name)
    with db.session() as session:
        return file_rows.create_file(session, tenant_id=TENANT, filename=path.name, purpose="fine-tune",
                                     size=path.stat().st_size, sha256="0" * 64, report=report.model_dump(mode="json"),
                                     status=file_rows.PROCESSED, status_details=None).id


def make_sweep(db: Database, file_id: str, **fields) -> str:
    data = {"name": "s", "base": {"model": {"base_model": "tiny-llama"}, "dataset": {"path": file_id},
                                  "training": {"max_steps": 8},
                                  "evaluation": {"metrics": ["loss"], "eval_every_steps": 2}},
            "objectives": [{"metric": "loss"}], **fields}
    spec = validate_sweep_spec(data)
    with db.session() as session:
        return sweep_rows.create_sweep(session, tenant_id=TENANT, name=spec.name, spec=spec.model_dump(mode="json")).id


def run_job(db: Database, job_id: str, *, valid: list[float] | None = None, final: float | None = None,
            fail: bool = False) -> None:
    """What a worker does with a job: claim it, ingest its validation metrics and final evaluation, end it."""
    with db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=job_id)
        if job.status == "queued":
            claimed = claim_next(session, worker_id=WORKER, nodes=[Node("cpu", 8)], free=[8], lease_seconds=60,
                                 now_s=time.time())
            assert claimed is not None and claimed.job_id == job_id
            job = job_rows.get_job_any_tenant(session, job_id=job_id)
    events = [{"type": "metrics", "data": {"step": 2 * (i + 1), "valid_loss": v}} for i, v in enumerate(valid or [])]
    if final is not None:
        events.append({"type": "message", "data": {"kind": "eval", "model": "fine-tuned", "metrics": {"loss": final}}})
    with db.session() as session:
        assert ingest(session, job_id=job_id, attempt=job.attempt, worker_id=WORKER, events=events,
                      offset=job.events_offset + len(json.dumps(events)))
        if final is not None:
            assert states.succeed(session, job_id=job_id, attempt=job.attempt, fine_tuned_model=f"ft:tiny-llama:t::{job_id}",
                                  trained_tokens=1)
        elif fail:
            assert states.fail(session, job_id=job_id, attempt=job.attempt,
                               error={"code": "training_failed", "message": "boom", "param": None})


def trials(db: Database, sweep_id: str):
    with db.read_session() as session:
        return sweep_rows.trials_with_jobs(session, sweep_id=sweep_id)


def sweep_row(db: Database, sweep_id: str):
    with db.read_session() as session:
        return sweep_rows.get_sweep(session, tenant_id=TENANT, sweep_id=sweep_id)


def test_grid_runs_every_point_as_a_job_within_the_parallelism_and_marks_the_best(pg_and_sqlite_db):
    db = pg_and_sqlite_db
    sweep_id = make_sweep(db, training_file(db), sampler="grid", parallelism=2, space={
        "adapter.type": {"type": "choice", "values": ["lora", "full"]},
        "adapter.rank": {"type": "choice", "values": [4, 8], "when": {"adapter.type": ["lora"]}},
        "training.learning_rate": {"type": "choice", "values": [1e-4, 1e-3]}})
    driver = SweepDriver(db, Settings.from_env(database_url=db.url))
    assert driver.run_once() == 2 and driver.run_once() == 0  # parallelism 2: nothing more while both run
    seen, losses = [], iter([0.9, 0.5, 0.7, 0.3, 0.8, 0.6])
    for _ in range(3):
        running = [(t, j) for t, j in trials(db, sweep_id) if t.status == "running"]
        assert len(running) == 2 and all(j.status == "queued" for _, j in running)
        for trial, job in running:
            assert job.spec["adapter"]["type"] == trial.params["adapter.type"]
            assert job.spec["training"]["learning_rate"] == trial.params["training.learning_rate"]
            assert job.spec["name"] == "s" and job.metadata_ == {"sweep": sweep_id, "sweep_trial": str(trial.number)}
            run_job(db, job.id, final=next(losses))
            seen.append(trial.params)
        driver.run_once()
    driver.run_once()
    # 2 x 2 lora points + 2 full points (rank does not apply to full: no duplicates), each once.
    assert sorted(map(json.dumps, seen)) == sorted(map(json.dumps, validate_sweep_spec(
        sweep_row(db, sweep_id).spec).grid_points()))
    assert len(seen) == 6 and sum("adapter.rank" in p for p in seen) == 4
    sweep = sweep_row(db, sweep_id)
    assert sweep.status == "succeeded" and "grid is done" in sweep.stop_reason
    best = min(((t.values[0], t) for t, _ in trials(db, sweep_id)), key=lambda pair: pair[0])[1]
    assert best.values == [0.3] and sweep.best_job_id == best.job_id
    shown = sweep_object(db, sweep, with_importance=True)
    assert shown.best[0].number == best.number and shown.trial_counts == {"succeeded": 6}
    assert shown.importance is not None and set(shown.importance) <= set(best.params) | {"adapter.rank"}


def median_sweep_after_one_trial(db, *, first_valid: list[float], max_trials: int = 3, **fields):
    """(sweep id, driver, the second trial's job): a random sweep under the median pruner (one warm-up trial)
    whose first trial finished at 0.5 with first_valid as its validation losses at steps 2, 4, ..."""
    sweep_id = make_sweep(db, training_file(db), sampler="random", parallelism=1, pruner="median",
                          pruner_warmup_trials=1, budget={"max_trials": max_trials}, **fields,
                          space={"training.learning_rate": {"type": "log_uniform", "low": 1e-5, "high": 1e-2}})
    driver = SweepDriver(db, Settings.from_env(database_url=db.url))
    driver.run_once()
    (_, job), = trials(db, sweep_id)
    run_job(db, job.id, valid=first_valid, final=0.5)
    driver.run_once()
    return sweep_id, driver, trials(db, sweep_id)[1][1]


def test_median_pruner_cancels_a_bad_trial_and_its_slot_goes_to_the_next(db):
    sweep_id, driver, job = median_sweep_after_one_trial(db, first_valid=[1.0, 0.8, 0.6])
    run_job(db, job.id, valid=[2.0, 1.9])  # worse than the median at steps 2 and 4: pruned, still running
    driver.run_once()
    rows = trials(db, sweep_id)
    assert rows[1][0].status == "pruned" and rows[1][1].status == "cancelled"  # the worker stops it at its next step
    assert rows[1][0].reported_step == 4 and "pruned by the sweep at step 4" in rows[1][0].error
    assert len(rows) == 3 and rows[2][0].status == "running"  # its slot went to the next trial at once


def test_pruner_warmup_steps_keeps_a_bad_trial_running_until_that_step(db):
    sweep_id, driver, job = median_sweep_after_one_trial(db, first_valid=[1.0, 0.8, 0.6], pruner_warmup_steps=6)
    run_job(db, job.id, valid=[2.0, 1.9])  # worse at steps 2 and 4, but the pruner judges from step 6 on
    driver.run_once()
    rows = trials(db, sweep_id)
    assert len(rows) == 2 and rows[1][0].status == "running" and rows[1][1].status == "running"
    with db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=rows[1][1].id)
    events = [{"type": "metrics", "data": {"step": 6, "valid_loss": 1.8}}]
    with db.session() as session:
        assert ingest(session, job_id=job.id, attempt=job.attempt, worker_id=WORKER, events=events,
                      offset=job.events_offset + len(json.dumps(events)))
    driver.run_once()
    rows = trials(db, sweep_id)
    assert rows[1][0].status == "pruned" and "pruned by the sweep at step 6" in rows[1][0].error


def test_a_trial_is_not_pruned_at_its_last_step_its_result_is_told(db):
    sweep_id, driver, job = median_sweep_after_one_trial(db, first_valid=[1.0, 0.8, 0.6, 0.5], max_trials=2)
    run_job(db, job.id, valid=[0.9, 0.7, 0.55, 3.0])  # worse than the median only at step 8 = max_steps
    driver.run_once()
    assert trials(db, sweep_id)[1][0].status == "running"
    with db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=job.id)
    run_job(db, job.id, final=3.0)
    driver.run_once()
    second = trials(db, sweep_id)[1][0]
    assert second.status == "succeeded" and second.values == [3.0]


def test_a_failed_trial_is_told_to_optuna_and_a_restarted_driver_carries_on(db):
    sweep_id = make_sweep(db, training_file(db), sampler="tpe", parallelism=1, budget={"max_trials": 2},
                          space={"adapter.rank": {"type": "int", "low": 2, "high": 16}})
    SweepDriver(db, Settings.from_env(database_url=db.url)).run_once()
    (_, job), = trials(db, sweep_id)
    run_job(db, job.id, fail=True)
    restarted = SweepDriver(db, Settings.from_env(database_url=db.url))  # a new process: state from the database
    restarted.run_once()
    rows = trials(db, sweep_id)
    assert [t.status for t, _ in rows] == ["failed", "running"] and "boom" in rows[0][0].error
    run_job(db, rows[1][1].id, final=0.4)
    restarted.run_once()
    sweep = sweep_row(db, sweep_id)
    assert sweep.status == "succeeded" and "max_trials" in sweep.stop_reason and sweep.best_job_id == rows[1][1].id


def test_a_gpu_hour_budget_stops_the_sweep_and_its_running_trials(db):
    sweep_id = make_sweep(db, training_file(db), sampler="random", parallelism=2, budget={"gpu_hours": 0.5},
                          space={"adapter.rank": {"type": "int", "low": 2, "high": 16}})
    driver = SweepDriver(db, Settings.from_env(database_url=db.url))
    driver.run_once()
    first, second = trials(db, sweep_id)
    run_job(db, first[1].id, final=0.5)
    with db.session() as session:  # the worker's accounting of the first trial: 20 minutes
        states.release_lease(session, job_id=first[1].id, worker_id=WORKER, gpu_seconds=1200.0)
    driver.run_once()
    assert [t.status for t, _ in trials(db, sweep_id)] == ["succeeded", "running", "running"]
    run_job(db, second[1].id, valid=[0.9])
    with db.session() as session:
        states.release_lease(session, job_id=second[1].id, worker_id=WORKER, gpu_seconds=0.0)
        job_rows.get_job_any_tenant(session, job_id=second[1].id).gpu_seconds = 900.0  # together over 0.5 h
    driver.run_once()
    rows = trials(db, sweep_id)
    assert [t.status for t, _ in rows] == ["succeeded", "cancelled", "cancelled"]
    assert all(j.status == "cancelled" for t, j in rows[1:])
    sweep = sweep_row(db, sweep_id)
    assert sweep.status == "succeeded" and "budget.gpu_hours" in sweep.stop_reason and sweep.best_job_id == first[1].id
    assert driver.run_once() == 0


def test_a_money_budget_counts_the_trials_priced_usage(db):
    from tuneforge.db import costs as cost_rows

    sweep_id = make_sweep(db, training_file(db), sampler="random", parallelism=1, budget={"cost_usd": 1.0},
                          space={"adapter.rank": {"type": "int", "low": 2, "high": 16}})
    driver = SweepDriver(db, Settings.from_env(database_url=db.url))
    driver.run_once()
    (_, job), = trials(db, sweep_id)
    run_job(db, job.id, valid=[0.9])
    with db.session() as session:  # what the worker records at its heartbeats (scheduler/cost.py)
        cost_rows.add_usage(session, tenant_id=TENANT, job_id=job.id, day="2026-12-01", device="cpu",
                            gpu_seconds=600.0, cost_usd=0.6)
    driver.run_once()
    assert [t.status for t, _ in trials(db, sweep_id)] == ["running"] and sweep_row(db, sweep_id).status == "running"
    with db.session() as session:
        cost_rows.add_usage(session, tenant_id=TENANT, job_id=job.id, day="2026-12-01", device="cpu",
                            gpu_seconds=600.0, cost_usd=0.6)
    driver.run_once()
    sweep = sweep_row(db, sweep_id)
    assert [t.status for t, _ in trials(db, sweep_id)] == ["cancelled"]
    assert sweep.status == "failed" and "budget.cost_usd reached (1.2 of 1 USD)" in sweep.stop_reason


def test_trials_are_priced_like_api_jobs_and_refused_over_their_own_budget(db):
    """A trial carries the cost estimate an API job would (the tenant's budget counts it), and a trial whose
    estimate passes the base spec's resources.max_gpu_hours is recorded failed instead of submitted."""
    from tuneforge.db import costs as cost_rows

    file_id = training_file(db)
    sweep_id = make_sweep(db, file_id, sampler="random", parallelism=1, budget={"max_trials": 1},
                          space={"adapter.rank": {"type": "int", "low": 2, "high": 16}})
    SweepDriver(db, Settings.from_env(database_url=db.url)).run_once()
    (_, job), = trials(db, sweep_id)
    with db.read_session() as session:
        priced = cost_rows.get_job_cost(session, job_id=job.id)
    assert priced.estimated_gpu_hours > 0 and priced.estimate["tokens"] > 0

    tight = {"name": "tight", "base": {"model": {"base_model": "tiny-llama"}, "dataset": {"path": file_id},
                                       "training": {"max_steps": 8}, "resources": {"max_gpu_hours": 1e-9},
                                       "evaluation": {"metrics": ["loss"], "eval_every_steps": 2}},
             "objectives": [{"metric": "loss"}], "sampler": "random", "budget": {"max_trials": 1},
             "space": {"adapter.rank": {"type": "int", "low": 2, "high": 16}}}
    spec = validate_sweep_spec(tight)
    with db.session() as session:
        tight_id = sweep_rows.create_sweep(session, tenant_id=TENANT, name="tight", spec=spec.model_dump(mode="json")).id
    SweepDriver(db, Settings.from_env(database_url=db.url)).run_once()
    (trial, job), = trials(db, tight_id)
    assert job is None and trial.status == "failed" and "max_gpu_hours" in trial.error


def test_cancel_stops_the_sweep_and_its_trials(db):
    sweep_id = make_sweep(db, training_file(db), sampler="random", parallelism=2, budget={"max_trials": 5},
                          space={"adapter.rank": {"type": "int", "low": 2, "high": 16}})
    driver = SweepDriver(db, Settings.from_env(database_url=db.url))
    driver.run_once()
    assert cancel_sweep(db, sweep_row(db, sweep_id)) and not cancel_sweep(db, sweep_row(db, sweep_id))
    assert {(t.status, j.status) for t, j in trials(db, sweep_id)} == {("cancelled", "cancelled")}
    assert driver.run_once() == 0 and sweep_row(db, sweep_id).status == "cancelled"


# ---- end to end: a real server on the tiny model (slow) --------------------------------------------------


def wait_until(predicate, *, what: str, server: ServerProcess, timeout: float = 600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{server.log_text()[-5000:]}")


@pytest.mark.slow
def test_a_sweep_on_a_server_prunes_survives_a_kill_and_registers_the_best(tmp_path):
    from tuneforge.db import model_versions as version_rows

    home, url = tmp_path / "home", f"sqlite:///{tmp_path / 'home' / 'tuneforge.db'}"
    home.mkdir()
    server = ServerProcess(home, url)
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['tenant-a']}"}, timeout=30)
    train = wait_validated(http, post_file(http, EXAMPLE_DATA / "train.jsonl")["id"])["id"]
    val = wait_validated(http, post_file(http, EXAMPLE_DATA / "val.jsonl")["id"])["id"]
    steps = 16
    body = {"name": "e2e", "sampler": "grid", "pruner": "median", "pruner_warmup_trials": 1, "parallelism": 1,
            "base": {"model": {"base_model": "tiny-llama"},
                     "dataset": {"path": train, "validation_path": val, "max_seq_length": 256},
                     "adapter": {"rank": 8, "alpha": 16, "dropout": 0.0},
                     "training": {"max_steps": steps, "per_device_batch_size": 4, "batch_size": 4, "seed": 0},
                     "evaluation": {"metrics": ["loss"], "eval_every_steps": 2, "max_eval_examples": 8,
                                    "eval_before_training": False},
                     "checkpoint": {"every_steps": 2}},
            # A good rate, one that learns nothing (pruned against the first trial's curve), and a faster one
            # (below the first curve at every step, so never pruned: the best).
            "space": {"training.learning_rate": {"type": "choice", "values": [1e-3, 1e-9, 3e-3]}},
            "objectives": [{"metric": "loss"}]}
    created = http.post("/v1/sweeps", json=body)
    assert created.status_code == 200, created.text
    sweep_id = created.json()["id"]

    def trial_list():
        return http.get(f"/v1/sweeps/{sweep_id}/trials").json()["data"]

    try:
        trials_now = wait_until(lambda: (t := trial_list()) and len(t) == 3 and t, what="the third trial", server=server)
        assert [t["status"] for t in trials_now[:2]] == ["succeeded", "pruned"]
        pruned = trials_now[1]
        metrics = http.get(f"/v1/fine_tuning/jobs/{pruned['job_id']}/metrics").json()["data"]
        assert max(m["step"] for m in metrics) < steps  # stopped at a step boundary, long before the end
        assert http.get(f"/v1/fine_tuning/jobs/{pruned['job_id']}").json()["status"] == "cancelled"
        # Kill the whole server tree while the third trial runs, then start it again on the same database.
        wait_until(lambda: any(m.get("step", 0) >= 2 for m in http.get(
            f"/v1/fine_tuning/jobs/{trials_now[2]['job_id']}/metrics").json()["data"]), what="trial 2 training",
            server=server)
        server.process.kill()
        server.process.wait()
        server.log.close()
        server = ServerProcess(home, url)
        http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.keys['tenant-a']}"},
                            timeout=30)
        done = wait_until(lambda: (s := http.get(f"/v1/sweeps/{sweep_id}").json())["status"] != "running" and s,
                          what="the sweep to finish after the restart", server=server)
        assert done["status"] == "succeeded" and "grid is done" in done["stop_reason"], done
        final = trial_list()
        assert [t["status"] for t in final] == ["succeeded", "pruned", "succeeded"]
        job = http.get(f"/v1/fine_tuning/jobs/{final[2]['job_id']}").json()
        assert job["tuneforge"]["attempt"] == 2  # resumed from its checkpoint as a new attempt, like any job
        best = min((t for t in final if t["status"] == "succeeded"), key=lambda t: t["values"][0])
        assert done["best"][0]["number"] == best["number"] and done["best"][0]["fine_tuned_model"]
        db = Database(url)
        with db.read_session() as session:
            version = version_rows.alias_target(session, tenant_id="tenant-a", name="e2e", alias="best")
            assert version is not None and version.model_id == done["best"][0]["fine_tuned_model"]
        db.dispose()
        shown = server.cli("sweep", "show", sweep_id, "--server", server.url, "--api-key", server.keys["tenant-a"])
        assert f"best: trial {best['number']}" in shown and "loss vs trial" in shown
    finally:
        server.stop()
