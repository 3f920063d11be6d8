"""Data access for cost: a job's estimate and actuals, tenants' monthly budgets, and the priced usage
records the worker writes, summed by job, by UTC day or month, per tenant or across tenants."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import now
from tuneforge.db.tables import JobCost, TenantBudget, UsageRecord


def record_estimate(session: Session, *, job_id: str, tenant_id: str, estimate: dict[str, Any] | None) -> JobCost:
    row = JobCost(job_id=job_id, tenant_id=tenant_id, estimate=estimate,
                  estimated_gpu_hours=(estimate or {}).get("gpu_hours"),
                  estimated_cost_usd=(estimate or {}).get("cost_usd"),
                  estimated_wall_seconds=(estimate or {}).get("wall_seconds"))
    session.add(row)
    return row


def get_job_cost(session: Session, *, job_id: str) -> JobCost | None:
    return session.get(JobCost, job_id)


def job_costs(session: Session, *, job_ids: list[str]) -> dict[str, JobCost]:
    return {row.job_id: row for row in session.scalars(select(JobCost).where(JobCost.job_id.in_(job_ids)))}


def record_actuals(session: Session, *, job_id: str, tenant_id: str, gpu_hours: float, cost_usd: float,
                   overhead_fraction: float | None, estimate_error: float | None) -> None:
    """The finished job's numbers (a job priced before cost existed gets its row now)."""
    row = session.get(JobCost, job_id) or record_estimate(session, job_id=job_id, tenant_id=tenant_id, estimate=None)
    row.actual_gpu_hours, row.actual_cost_usd = gpu_hours, cost_usd
    row.overhead_fraction, row.estimate_error, row.finalized_at = overhead_fraction, estimate_error, now()


def add_usage(session: Session, *, tenant_id: str, job_id: str, day: str, device: str, gpu_seconds: float,
              cost_usd: float) -> None:
    session.add(UsageRecord(tenant_id=tenant_id, job_id=job_id, day=day, device=device, gpu_seconds=gpu_seconds,
                            cost_usd=cost_usd, created_at=now()))


def job_usage(session: Session, *, job_id: str) -> tuple[float, float]:
    """(GPU-seconds, USD) recorded for a job so far."""
    seconds, cost = session.execute(select(func.coalesce(func.sum(UsageRecord.gpu_seconds), 0.0),
                                           func.coalesce(func.sum(UsageRecord.cost_usd), 0.0))
                                    .where(UsageRecord.job_id == job_id)).one()
    return float(seconds), float(cost)


def tenant_usage_since(session: Session, *, tenant_id: str, first_day: str) -> tuple[float, float]:
    """(GPU-seconds, USD) of a tenant's usage from first_day (YYYY-MM-DD, UTC) on."""
    seconds, cost = session.execute(select(func.coalesce(func.sum(UsageRecord.gpu_seconds), 0.0),
                                           func.coalesce(func.sum(UsageRecord.cost_usd), 0.0))
                                    .where(UsageRecord.tenant_id == tenant_id, UsageRecord.day >= first_day)).one()
    return float(seconds), float(cost)


def usage_by_period(session: Session, *, tenant_id: str | None, period: str, since: str | None = None,
                    until: str | None = None) -> list[tuple[str, str, float, float, int]]:
    """[(tenant, day or month, GPU-seconds, USD, jobs)] oldest first; tenant_id None: every tenant (admins)."""
    key = UsageRecord.day if period == "day" else func.substr(UsageRecord.day, 1, 7)
    query = select(UsageRecord.tenant_id, key.label("period"), func.sum(UsageRecord.gpu_seconds),
                   func.sum(UsageRecord.cost_usd), func.count(func.distinct(UsageRecord.job_id)))
    if tenant_id is not None:
        query = query.where(UsageRecord.tenant_id == tenant_id)
    if since:
        query = query.where(UsageRecord.day >= since)
    if until:
        query = query.where(UsageRecord.day <= until)
    query = query.group_by(UsageRecord.tenant_id, key).order_by(key, UsageRecord.tenant_id)
    return [(tenant, str(when), float(seconds), float(cost), int(jobs))
            for tenant, when, seconds, cost, jobs in session.execute(query)]


def get_budget(session: Session, *, tenant_id: str) -> TenantBudget | None:
    return session.get(TenantBudget, tenant_id)


def set_budget(session: Session, *, tenant_id: str, monthly_cost_usd: float | None,
               monthly_gpu_hours: float | None) -> TenantBudget:
    row = session.get(TenantBudget, tenant_id)
    if row is None:
        row = TenantBudget(tenant_id=tenant_id)
        session.add(row)
    row.monthly_cost_usd, row.monthly_gpu_hours, row.updated_at = monthly_cost_usd, monthly_gpu_hours, now()
    session.flush()
    return row
