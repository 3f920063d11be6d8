"""One way in for every job: the checks a job must pass before it exists, then its creation and
admission in one short write transaction.

The checks (capacity, memory plan, strategy) run outside any transaction: they read a snapshot of the
live workers and call the torch-free planner, so no other tenant's upload or claim ever waits on them.
`POST /jobs`, `POST /jobs/plan` and the CLI ask the same question, so a plan and a create cannot disagree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from tuneforge.db import job_events as event_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import quotas
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.tables import Job
from tuneforge.egress import judge_endpoint_problem, spec_endpoint_problem
from tuneforge.launch.capabilities import reporter_problem
from tuneforge.launch.deepspeed import deepspeed_problem
from tuneforge.scheduler import cost
from tuneforge.scheduler.admission import (admit_job, capacity_problem, host_memory_problem, memory_plan,
                                           memory_problem, shared_storage_problem, strategy_problem)
from tuneforge.spec.job import JobSpec


@dataclass(frozen=True)
class SubmissionProblem:
    """Why a job cannot be created: the message, the request field at fault and an error code."""

    message: str
    param: str | None
    code: str


class QuotaExceeded(Exception):
    """The tenant has as many unfinished jobs as its max_active_jobs allows; nothing was created."""

    def __init__(self, problem: SubmissionProblem):
        super().__init__(problem.message)
        self.problem = problem


@dataclass(frozen=True)
class SubmissionCheck:
    memory: dict[str, Any] | None  # the planner's per-GPU plan, None for a model it cannot describe
    problem: SubmissionProblem | None


def check_submission(spec: JobSpec, inventories: list[dict[str, Any]]) -> SubmissionCheck:
    """Can any live worker hold the job, does it fit the GPUs it asks for, can its strategy run? Checks
    structure only where the answer would need torch (the API process never imports it)."""
    memory = memory_plan(spec, inventories)
    if problem := capacity_problem(spec, inventories):
        return SubmissionCheck(memory, SubmissionProblem(problem, "tuneforge.resources", "insufficient_capacity"))
    if problem := shared_storage_problem(spec, inventories):
        return SubmissionCheck(memory, SubmissionProblem(problem, "tuneforge.resources.num_nodes", "job_root_not_shared"))
    if problem := memory_problem(memory):
        return SubmissionCheck(memory, SubmissionProblem(problem, "tuneforge.resources", "insufficient_memory"))
    if problem := host_memory_problem(memory):
        return SubmissionCheck(memory, SubmissionProblem(problem, "tuneforge.resources", "insufficient_host_memory"))
    if problem := strategy_problem(spec, inventories):
        return SubmissionCheck(memory, SubmissionProblem(problem, "tuneforge.resources.strategy", "invalid_strategy"))
    if problem := deepspeed_problem(spec, deepspeed_classes=False):
        param = "tuneforge.resources.deepspeed_config" if spec.resources.deepspeed_config else "tuneforge.resources.strategy"
        return SubmissionCheck(memory, SubmissionProblem(problem, param, "invalid_strategy"))
    if problem := reporter_problem(list(spec.monitoring.reporters), inventories):
        return SubmissionCheck(memory, SubmissionProblem(problem, "tuneforge.monitoring.reporters", "invalid_reporter"))
    if found := spec_endpoint_problem(spec):  # a judge endpoint unknown, or its host private (SSRF)
        return SubmissionCheck(memory, SubmissionProblem(found[1], f"tuneforge.{found[0]}", "judge_endpoint_refused"))
    return SubmissionCheck(memory, None)


def judge_endpoint_refusal(name: str, settings) -> str | None:
    """Why a judge in a request (an eval's testing criteria) may not call the configured endpoint `name`: the
    same rule a job spec's judges meet at submission (unknown endpoint, or a host the egress rules refuse)."""
    return judge_endpoint_problem(name, settings)


def budget_problem(spec: JobSpec, estimate) -> SubmissionProblem | None:
    """The job's cost estimate (scheduler/cost.py) is over its own resources.max_cost_usd / max_gpu_hours."""
    if found := cost.job_budget_problem(spec, estimate):
        return SubmissionProblem(found[0], found[1], "over_job_budget")
    return None


def submit_job(session: Session, *, tenant_id: str, spec: JobSpec, model: str, training_file: str,
               validation_file: str | None, suffix: str | None, metadata: dict[str, str] | None,
               idempotency_key: str | None, request_hash: str | None, estimate=None) -> Job:
    """Create the job and admit it (queued, failed with its files' report, or validating_files while a
    file is still being validated) in the caller's transaction: a job is never left half-admitted.
    Raises QuotaExceeded when the tenant is at its max_active_jobs (counted under the tenant's lock, so
    concurrent creations cannot pass it together)."""
    tenant_rows.lock_tenant(session, tenant_id=tenant_id)
    tenant = tenant_rows.get_tenant(session, tenant_id=tenant_id)
    if tenant is not None and tenant.max_active_jobs is not None:
        active = quotas.active_jobs(session, tenant_id=tenant_id)
        if active >= tenant.max_active_jobs:
            raise QuotaExceeded(SubmissionProblem(
                f"tenant {tenant_id!r} has {active} unfinished job(s), its quota (max_active_jobs) is "
                f"{tenant.max_active_jobs}: wait for one to finish, or cancel one", None, "quota_exceeded"))
    # The tenant's monthly budget, under the same lock: `estimate` is scheduler.cost.estimate_job's (None: unpriced).
    if problem := cost.tenant_budget_problem(session, tenant_id=tenant_id, estimate=estimate, now_s=time.time()):
        raise QuotaExceeded(SubmissionProblem(problem, None, "budget_exceeded"))
    job = job_rows.create_job(
        session, tenant_id=tenant_id, spec=spec, model=model, training_file=training_file,
        validation_file=validation_file, suffix=suffix, metadata=metadata, idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    event_rows.add_event(session, job_id=job.id, message=f"Validating training file: {training_file}",
                         data={"kind": "status", "status": job.status})
    cost.record_estimate(session, job=job, estimate=estimate)
    admit_job(session, job=job)
    session.refresh(job)  # admission changed the status with a guarded UPDATE
    return job
