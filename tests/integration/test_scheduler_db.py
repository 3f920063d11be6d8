"""The state machine, claims, leases and the reaper against real SQLite and PostgreSQL databases: a stale
worker changes nothing, concurrent workers never claim a job twice, tenant limits hold, expired leases
re-queue, and the migrations go up, down and up with no drift from the tables."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tuneforge.db import jobs as job_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.migrate import downgrade, upgrade
from tuneforge.db.session import Database
from tuneforge.scheduler import states
from tuneforge.scheduler.placement import Node
from tuneforge.scheduler.queue import claim_next
from tuneforge.scheduler.reaper import Reaper
from tuneforge.settings import Settings
from tuneforge.spec import validate_job_spec

CPU_NODE = [Node("cpu", 1000)]


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    upgrade(database.engine)
    yield database
    database.dispose()


def queued_job(db: Database, tenant: str = "t", gpus: int = 1, strategy: str = "ddp") -> str:
    spec = validate_job_spec({"dataset": {"path": "file-x"}, "resources": {"num_gpus": gpus, "strategy": strategy}})
    with db.session() as session:
        tenant_rows.ensure_tenant(session, tenant_id=tenant)
        job = job_rows.create_job(session, tenant_id=tenant, spec=spec, model="tiny-llama", training_file="file-x",
                                  validation_file=None, suffix=None, metadata=None)
        assert states.admit(session, job_id=job.id)
        return job.id


def claim(db: Database, worker: str, *, free=(1000,), lease=60.0, now=None):
    with db.session() as session:
        return claim_next(session, worker_id=worker, nodes=CPU_NODE, free=list(free), lease_seconds=lease,
                          now_s=now or time.time())


def test_migrations_upgrade_downgrade_upgrade_without_drift(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from optuna.storages._rdb import models as optuna_models

    from tuneforge.db.tables import Base

    optuna_tables = set(optuna_models.BaseModel.metadata.tables)

    def table_of(obj, name, type_):
        return name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)

    def ours(obj, name, type_, reflected, compare_to):  # Optuna's tables are compared with Optuna's metadata
        return table_of(obj, name, type_) not in optuna_tables

    def optunas(obj, name, type_, reflected, compare_to):
        return table_of(obj, name, type_) in optuna_tables

    database = Database(database_url)
    upgrade(database.engine)
    downgrade(database.engine)
    upgrade(database.engine)
    with database.engine.connect() as connection:
        drift = compare_metadata(MigrationContext.configure(connection, opts={"include_object": ours}), Base.metadata)
        drift += compare_metadata(MigrationContext.configure(connection, opts={"include_object": optunas}),
                                  optuna_models.BaseModel.metadata)
    if database.is_sqlite:  # SQLite does not reflect DESC in an index: alembic sees ix_jobs_queue as changed
        drift = [d for d in drift if not (d[0] in ("add_index", "remove_index") and d[1].name == "ix_jobs_queue")]
    database.dispose()
    assert drift == []


def test_a_stale_attempt_can_never_overwrite_a_newer_one(db):
    job_id = queued_job(db)
    first = claim(db, "w1", lease=0.01)
    assert first.attempt == 1
    time.sleep(0.05)
    assert Reaper(db, Settings.from_env(database_url=db.url)).run_once()["requeued"] == 1
    second = claim(db, "w2")
    assert second.job_id == job_id and second.attempt == 2
    with db.session() as session:
        assert not states.succeed(session, job_id=job_id, attempt=1, fine_tuned_model="stale", trained_tokens=1)
        assert not states.fail(session, job_id=job_id, attempt=1, error={"code": "x", "message": "stale", "param": None})
        assert not states.renew_lease(session, job_id=job_id, worker_id="w1", lease_until=time.time() + 60)
        assert not states.release_lease(session, job_id=job_id, worker_id="w1", gpu_seconds=7.0)
        assert states.succeed(session, job_id=job_id, attempt=2, fine_tuned_model="ft:x", trained_tokens=5)
    with db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=job_id)
        assert (job.status, job.attempt, job.fine_tuned_model, job.lease_owner) == ("succeeded", 2, "ft:x", "w2")
        # The stale worker lost the lease, not the device time it spent (a cancelled job whose lease ran out
        # while it stopped counted 0 GPU-hours on the usage page).
        assert job.gpu_seconds == 7.0


def test_concurrent_workers_never_claim_the_same_job_twice(db):
    jobs = {queued_job(db, tenant=f"t{i % 3}") for i in range(40)}
    claims: list[tuple[str, int, str]] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while True:
            claimed = claim(db, name)
            if claimed is None:
                return
            with lock:
                claims.append((claimed.job_id, claimed.attempt, name))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(c[0] for c in claims) == sorted(jobs)  # each job exactly once
    with db.session() as session:
        owners = {job_id: job_rows.get_job_any_tenant(session, job_id=job_id).lease_owner for job_id in jobs}
    assert owners == {job_id: name for job_id, _, name in claims}


def test_claims_respect_tenant_limits_and_fair_share(db):
    with db.session() as session:
        tenant_rows.set_tenant_limits(session, tenant_id="capped", max_running_jobs=1, max_gpus=None)
    capped = [queued_job(db, tenant="capped") for _ in range(3)]
    other = [queued_job(db, tenant="other") for _ in range(3)]
    taken = [claim(db, "w").job_id for _ in range(4)]
    assert claim(db, "w") is None  # the capped tenant's other jobs wait
    assert sum(job in capped for job in taken) == 1 and set(other) <= set(taken)
    assert taken[:2] in ([capped[0], other[0]], [other[0], capped[0]])  # tenants alternate


def test_resume_waits_for_the_previous_attempt_to_let_go(db):
    job_id = queued_job(db)
    claim(db, "w1")
    with db.session() as session:
        assert states.pause(session, job_id=job_id)
        assert states.resume(session, job_id=job_id)
    assert claim(db, "w2") is None  # w1's recipe may still be writing its checkpoint
    with db.session() as session:
        assert states.release_lease(session, job_id=job_id, worker_id="w1", gpu_seconds=3.0)
    second = claim(db, "w2")
    assert second.job_id == job_id and second.attempt == 2


def test_a_job_that_keeps_losing_its_worker_fails(db):
    job_id = queued_job(db)
    reaper = Reaper(db, Settings.from_env(database_url=db.url, max_attempts=2))
    for _ in range(2):
        assert claim(db, "w", lease=0.01) is not None
        time.sleep(0.05)
        reaper.run_once()
    with db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=job_id)
    assert job.status == "failed" and job.error["code"] == "too_many_attempts"


def test_a_worker_claims_only_jobs_whose_strategy_it_offers_and_submission_asks_the_workers(db):
    from tuneforge.scheduler.submission import check_submission

    deepspeed_job = queued_job(db, strategy="deepspeed")
    ddp_job = queued_job(db)
    with db.session() as session:
        mine = claim_next(session, worker_id="no-ds", nodes=CPU_NODE, free=[1000], lease_seconds=60,
                          now_s=time.time(), strategies=["ddp", "fsdp"])
        assert mine.job_id == ddp_job
        assert claim_next(session, worker_id="no-ds", nodes=CPU_NODE, free=[1000], lease_seconds=60,
                          now_s=time.time(), strategies=["ddp", "fsdp"]) is None  # the deepspeed job waits
        theirs = claim_next(session, worker_id="ds", nodes=CPU_NODE, free=[1000], lease_seconds=60,
                            now_s=time.time(), strategies=["ddp", "fsdp", "deepspeed"])
        assert theirs.job_id == deepspeed_job

    spec = validate_job_spec({"dataset": {"path": "file-x"}, "resources": {"strategy": "deepspeed"}})
    without = [{"worker": "w", "executor": "local", "nodes": [{"gpu_type": "cpu", "gpus": 4, "strategies": ["ddp", "fsdp"]}]}]
    problem = check_submission(spec, without).problem
    assert problem.code == "invalid_strategy" and problem.param == "tuneforge.resources.strategy"
    assert "deepspeed" in problem.message and "ddp, fsdp" in problem.message
    with_ds = [*without, {"worker": "v", "executor": "local",
                          "nodes": [{"gpu_type": "cpu", "gpus": 4, "strategies": ["ddp", "fsdp", "deepspeed"]}]}]
    assert check_submission(spec, with_ds).problem is None
    assert check_submission(spec, []).problem is None  # no worker yet: the job waits for one


def test_capacity_of_a_job_is_checked_against_free_gpus(db, tmp_path: Path):
    big = queued_job(db, gpus=4)
    small = queued_job(db, gpus=1)
    with db.session() as session:
        claimed = claim_next(session, worker_id="w", nodes=[Node("cpu", 2)], free=[2], lease_seconds=60, now_s=time.time())
    assert claimed.job_id == small and claimed.nodes == ((0, 1),)
    assert big  # still queued: it needs a bigger node


@pytest.mark.parametrize("last_status,expected", [("preempted", "queued"), ("running", "failed")])
def test_a_torchrun_exit_after_every_rank_was_preempted_requeues_the_job(db, tmp_path, last_status, expected):
    """torchrun exits 1 even when every rank checkpointed and exited 75: the recipe's own last status
    event decides whether the attempt was preempted (requeued) or failed."""
    from tuneforge.scheduler.executors.local import LocalExecutor
    from tuneforge.scheduler.worker import Attempt, Worker

    from tuneforge.launch.outcome import RecipeReport

    job_id = queued_job(db)
    claimed = claim(db, "w")
    settings = Settings.from_env(database_url=db.url, max_attempts=3)
    worker = Worker(db, settings, LocalExecutor(), worker_id="w")
    spec = validate_job_spec({"dataset": {"path": "file-x"}, "checkpoint": {"max_restarts": 0}})
    attempt = Attempt(job_id=job_id, tenant_id="t", attempt=claimed.attempt, spec=spec, job_dir=tmp_path / job_id,
                      nodes=claimed.nodes, gpus=1, started=time.time(), last_renewal=time.time(),
                      report=RecipeReport(status=last_status))
    worker._finish(attempt, 1)
    with db.session() as session:
        assert job_rows.get_job_any_tenant(session, job_id=job_id).status == expected


class _Run:
    """A recipe run that has already exited with `code`."""

    def __init__(self, code: int):
        self.code, self.closed = code, False

    def poll(self):
        return self.code

    def terminate(self):
        pass

    def kill(self):
        pass

    def close(self):
        self.closed = True


class _RecordingExecutor:
    """Starts nothing: records each launch's restart count and hands back a run that crashed."""

    kind = "local"

    def __init__(self):
        self.restarts: list[int] = []

    def inventory(self):
        return list(CPU_NODE)

    def strategies(self):
        return ["ddp"]

    def launch(self, *, job_id, attempt, job_dir, spec, placement, restart=0):
        self.restarts.append(restart)
        return _Run(1)


def _crashed_attempt(db, tmp_path, *, max_restarts: int, retryable: bool):
    from tuneforge.launch.outcome import RecipeReport
    from tuneforge.scheduler.worker import Attempt, Worker

    job_id = queued_job(db)
    claimed = claim(db, "w")
    executor = _RecordingExecutor()
    worker = Worker(db, Settings.from_env(database_url=db.url), executor, worker_id="w")
    spec = validate_job_spec({"dataset": {"path": "file-x"}, "checkpoint": {"max_restarts": max_restarts}})
    attempt = Attempt(job_id=job_id, tenant_id="t", attempt=claimed.attempt, spec=spec, job_dir=tmp_path / job_id,
                      nodes=claimed.nodes, gpus=1, started=time.time(), last_renewal=time.time(), run=_Run(1),
                      report=RecipeReport(status="failed", error="InjectedCrash: boom", retryable=retryable, last_step=3))
    worker.attempts[job_id] = attempt
    return worker, executor, attempt


def _job_and_events(db, job_id):
    from tuneforge.db.job_events import list_events

    with db.session() as session:
        job = job_rows.get_job_any_tenant(session, job_id=job_id)
        events = list_events(session, job_id=job_id, limit=100)[0]
        return job, [e.data or {} for e in events]


def test_a_crashed_recipe_restarts_in_place_from_its_checkpoint_until_max_restarts(db, tmp_path):
    worker, executor, attempt = _crashed_attempt(db, tmp_path, max_restarts=2, retryable=True)
    for expected in (1, 2):
        worker._finish(attempt, 1)
        job, events = _job_and_events(db, attempt.job_id)
        assert job.status == "running" and job.restarts == expected and job.attempt == attempt.attempt
        assert executor.restarts[-1] == expected  # the executor knows which run this is (TUNEFORGE_RESTART)
        attempt.report.error, attempt.report.retryable = "InjectedCrash: boom", True  # the next run crashes too
    restarts = [e for e in events if e.get("kind") == "restart"]
    assert [e["restart"] for e in restarts] == [2, 1] and restarts[0]["reason"] == "InjectedCrash: boom"
    worker._finish(attempt, 1)  # no restart left
    job, _ = _job_and_events(db, attempt.job_id)
    assert job.status == "failed" and job.restarts == 2 and executor.restarts == [1, 2]
    assert "InjectedCrash: boom" in job.error["message"] and "after 2 restarts" in job.error["message"]
    assert attempt.job_id not in worker.attempts


def test_bad_input_is_never_restarted(db, tmp_path):
    worker, executor, attempt = _crashed_attempt(db, tmp_path, max_restarts=2, retryable=False)
    worker._finish(attempt, 1)  # torchrun's 1 for a rank's 2: the failure event says not retryable
    job, events = _job_and_events(db, attempt.job_id)
    assert job.status == "failed" and job.restarts == 0 and executor.restarts == []
    assert not [e for e in events if e.get("kind") == "restart"]
