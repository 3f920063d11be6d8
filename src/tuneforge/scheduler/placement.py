"""Placement: which queued jobs start now, and on which nodes. Pure functions over plain values, shared by
the worker's real claims and by `tuneforge simulate`, so the simulation measures the code that runs.

Rules, in order:
- fair share between tenants: the tenant holding the fewest GPUs (divided by its weight) goes next;
- within a tenant: higher priority first, then the oldest job;
- per-tenant limits on running jobs and GPUs;
- a job needs num_nodes distinct nodes with num_gpus free GPUs of its type each (CPU slots on machines
  without a GPU count as GPUs of type "cpu"); nodes are chosen best-fit, to keep big holes for big jobs;
- backfill: a job that does not fit is passed over, unless it has waited `reserve_after` seconds and could
  fit on these nodes when they drain; then nothing behind it starts, so big jobs cannot starve.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

CPU = "cpu"
ANY = "any"


@dataclass(frozen=True)
class Node:
    gpu_type: str
    gpus: int


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    tenant_id: str
    gpus_per_node: int
    num_nodes: int = 1
    gpu_type: str = ANY
    priority: int = 0
    seq: int = 0  # submission order
    queued_since: float = 0.0

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.num_nodes


@dataclass(frozen=True)
class TenantPolicy:
    max_running_jobs: int | None = None
    max_gpus: int | None = None
    weight: float = 1.0


@dataclass
class Usage:
    jobs: int = 0
    gpus: int = 0


@dataclass(frozen=True)
class Placement:
    job: JobRequest
    nodes: tuple[tuple[int, int], ...]  # (node index, GPUs taken there)


@dataclass
class PlanResult:
    placements: list[Placement] = field(default_factory=list)
    blocked_by: JobRequest | None = None  # the reserved job that stopped the pass, if any


def type_matches(wanted: str, node_type: str) -> bool:
    return wanted == ANY or wanted == node_type


def assign(job: JobRequest, nodes: Sequence[Node], free: Sequence[int]) -> tuple[tuple[int, int], ...] | None:
    """num_nodes distinct nodes that can each give gpus_per_node GPUs, tightest fit first; None if none."""
    eligible = [i for i, node in enumerate(nodes) if type_matches(job.gpu_type, node.gpu_type) and free[i] >= job.gpus_per_node]
    if len(eligible) < job.num_nodes:
        return None
    eligible.sort(key=lambda i: (free[i], i))
    return tuple((i, job.gpus_per_node) for i in eligible[: job.num_nodes])


def could_ever_fit(job: JobRequest, nodes: Sequence[Node]) -> bool:
    return assign(job, nodes, [node.gpus for node in nodes]) is not None


def within_limits(job: JobRequest, usage: Usage, policy: TenantPolicy) -> bool:
    if policy.max_running_jobs is not None and usage.jobs + 1 > policy.max_running_jobs:
        return False
    return policy.max_gpus is None or usage.gpus + job.gpus <= policy.max_gpus


def plan(
    queued: Iterable[JobRequest],
    nodes: Sequence[Node],
    free: Sequence[int],
    *,
    usage: Mapping[str, Usage] | None = None,
    policies: Mapping[str, TenantPolicy] | None = None,
    now: float = 0.0,
    reserve_after: float = float("inf"),
) -> PlanResult:
    """The placements to make now, in order; `free` and `usage` are not modified."""
    free = list(free)
    usage = {tenant: replace(u) for tenant, u in (usage or {}).items()}
    policies = policies or {}
    queues: dict[str, list[JobRequest]] = {}
    for job in queued:
        queues.setdefault(job.tenant_id, []).append(job)
    for jobs in queues.values():
        jobs.sort(key=lambda j: (-j.priority, j.seq))
    heads = {tenant: 0 for tenant in queues}
    result = PlanResult()
    while heads:
        def share(tenant: str) -> tuple[float, int]:
            weight = policies.get(tenant, TenantPolicy()).weight
            return usage.get(tenant, Usage()).gpus / weight, queues[tenant][heads[tenant]].seq

        tenant = min(heads, key=share)
        job = queues[tenant][heads[tenant]]
        heads[tenant] += 1
        if heads[tenant] == len(queues[tenant]):
            del heads[tenant]
        tenant_usage = usage.setdefault(tenant, Usage())
        if not within_limits(job, tenant_usage, policies.get(tenant, TenantPolicy())):
            continue
        taken = assign(job, nodes, free)
        if taken is None:
            if now - job.queued_since >= reserve_after and could_ever_fit(job, nodes):
                result.blocked_by = job
                break
            continue
        for index, gpus in taken:
            free[index] -= gpus
        tenant_usage.jobs += 1
        tenant_usage.gpus += job.gpus
        result.placements.append(Placement(job, taken))
    return result
