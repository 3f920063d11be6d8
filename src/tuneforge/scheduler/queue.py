"""Claiming queued jobs: plan over every tenant's head of queue, then lock and take one job atomically.

PostgreSQL: candidates are read without locks, then the chosen one is locked with FOR UPDATE SKIP LOCKED
(workers racing for it skip to their next choice instead of waiting), and the tenant's row is locked
while its limits are re-counted. SQLite: the whole claim is one IMMEDIATE transaction, which no other
writer can interleave with. Either way the status moves only through states.claim, guarded by attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from tuneforge.db import jobs as job_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.tables import Job
from tuneforge.scheduler import states
from tuneforge.scheduler.placement import JobRequest, Node, Placement, TenantPolicy, Usage, plan, within_limits


@dataclass(frozen=True)
class Claimed:
    job_id: str
    tenant_id: str
    attempt: int
    spec: dict
    nodes: tuple[tuple[int, int], ...]
    gpus: int


def strategy_of(spec: dict) -> str:
    return (spec.get("resources") or {}).get("strategy", "ddp")


def request_of_row(job: Job) -> JobRequest:
    return JobRequest(
        job_id=job.id, tenant_id=job.tenant_id, gpus_per_node=job.num_gpus, num_nodes=job.num_nodes,
        gpu_type=job.gpu_type, priority=job.priority, seq=job.seq, queued_since=float(job.created_at),
    )


def policies_of(session: Session) -> dict[str, TenantPolicy]:
    return {
        t.id: TenantPolicy(max_running_jobs=t.max_running_jobs, max_gpus=t.max_gpus, weight=t.weight or 1.0)
        for t in tenant_rows.tenants_by_id(session).values()
    }


def claim_next(
    session: Session, *, worker_id: str, nodes: Sequence[Node], free: Sequence[int], lease_seconds: float, now_s: float,
    reserve_after: float = float("inf"), strategies: Sequence[str] | None = None,
) -> Claimed | None:
    """Take the job placement picks for these free nodes, or None when nothing can start here now.
    strategies: what this worker can run (None: anything); a job needing another waits for another worker."""
    candidates = [job for job in job_rows.queued_candidates(session, now_s=now_s)
                  if strategies is None or strategy_of(job.spec) in strategies]
    if not candidates:
        return None
    usage = {tenant: Usage(jobs, gpus) for tenant, (jobs, gpus) in job_rows.running_usage(session).items()}
    policies = policies_of(session)
    proposal = plan(
        [request_of_row(job) for job in candidates], nodes, free, usage=usage, policies=policies, now=now_s,
        reserve_after=reserve_after,
    )
    for placement in proposal.placements:
        claimed = _try_claim(session, placement, policies, worker_id=worker_id, lease_seconds=lease_seconds, now_s=now_s)
        if claimed is not None:
            return claimed
    return None


def _try_claim(
    session: Session, placement: Placement, policies: dict[str, TenantPolicy], *, worker_id: str, lease_seconds: float,
    now_s: float,
) -> Claimed | None:
    job = job_rows.lock_claimable(session, job_id=placement.job.job_id, now_s=now_s)
    if job is None:
        return None
    policy = policies.get(job.tenant_id)
    if policy is not None and (policy.max_running_jobs is not None or policy.max_gpus is not None):
        tenant_rows.lock_tenant(session, tenant_id=job.tenant_id)
        jobs, gpus = job_rows.running_usage(session, tenant_id=job.tenant_id).get(job.tenant_id, (0, 0))
        if not within_limits(placement.job, Usage(jobs, gpus), policy):
            return None
    taken = states.claim(
        session, job_id=job.id, attempt=job.attempt, worker_id=worker_id, lease_until=now_s + lease_seconds,
        placement={"nodes": [list(n) for n in placement.nodes]}, now_s=now_s,
    )
    if not taken:
        return None
    return Claimed(
        job_id=job.id, tenant_id=job.tenant_id, attempt=job.attempt, spec=dict(job.spec), nodes=placement.nodes,
        gpus=placement.job.gpus,
    )
