"""/v1/tuneforge: cost and usage. A tenant's usage by UTC day or month (JSON or CSV), its prices and its
monthly budget; for admins the same across tenants, and each tenant's budget."""

from __future__ import annotations

import csv
import io
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from tuneforge.api.dependencies import AdminCaller, Db, Reader
from tuneforge.api.errors import ApiError
from tuneforge.db import costs as cost_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.scheduler.cost import month_start, tenant_rates
from tuneforge.spec.api import TENANT_NAME, TenantBudgetObject, TenantBudgetRequest

router = APIRouter(prefix="/v1/tuneforge", tags=["tuneforge"])
TenantId = Annotated[str, Path(pattern=TENANT_NAME)]
DAY = r"^\d{4}-\d{2}-\d{2}$"
Period = Literal["day", "month"]
Format = Literal["json", "csv"]
CSV_COLUMNS = ("tenant", "period", "gpu_hours", "cost_usd", "jobs")


def _rows(db, tenant_id: str | None, period: str, since: str | None, until: str | None) -> list[dict]:
    with db.read_session() as session:
        rows = cost_rows.usage_by_period(session, tenant_id=tenant_id, period=period, since=since, until=until)
    return [{"tenant": tenant, "period": when, "gpu_hours": round(seconds / 3600, 6), "cost_usd": round(cost, 6),
             "jobs": jobs} for tenant, when, seconds, cost, jobs in rows]


def _answer(rows: list[dict], period: str, format: str, name: str, **extra) -> Response | dict:
    if format == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return Response(out.getvalue(), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}-{period}.csv"'})
    return {"object": "tuneforge.usage_report", "period": period, "currency": "usd", "data": rows,
            "gpu_hours": round(sum(r["gpu_hours"] for r in rows), 6),
            "cost_usd": round(sum(r["cost_usd"] for r in rows), 6), **extra}


def _budget(session, tenant_id: str) -> TenantBudgetObject:
    now_s = time.time()
    budget = cost_rows.get_budget(session, tenant_id=tenant_id)
    seconds, cost = cost_rows.tenant_usage_since(session, tenant_id=tenant_id, first_day=month_start(now_s))
    return TenantBudgetObject(tenant=tenant_id, month=month_start(now_s)[:7],
                              monthly_cost_usd=budget.monthly_cost_usd if budget else None,
                              monthly_gpu_hours=budget.monthly_gpu_hours if budget else None,
                              cost_usd=round(cost, 6), gpu_hours=round(seconds / 3600, 6))


Since = Query(None, pattern=DAY, description="First UTC day (YYYY-MM-DD), inclusive.")
Until = Query(None, pattern=DAY, description="Last UTC day (YYYY-MM-DD), inclusive.")


@router.get("/usage/costs", response_model=None)
def my_costs(caller: Reader, db: Db, period: Period = "day", since: str | None = Since, until: str | None = Until,
             format: Format = "json") -> Response | dict:
    """The caller's tenant's GPU-hours and cost by UTC day or month (retries and evaluation included), and
    its monthly budget; format=csv for a spreadsheet."""
    rows = _rows(db, caller.tenant_id, period, since, until)
    if format == "csv":
        return _answer(rows, period, format, f"tuneforge-usage-{caller.tenant_id}")
    with db.read_session() as session:
        budget = _budget(session, caller.tenant_id)
    return _answer(rows, period, format, "", tenant=caller.tenant_id, budget=budget.model_dump())


@router.get("/admin/costs", response_model=None)
def all_costs(caller: AdminCaller, db: Db, period: Period = "day", since: str | None = Since,
              until: str | None = Until, tenant: str | None = Query(None, pattern=TENANT_NAME),
              format: Format = "json") -> Response | dict:
    """Admins: every tenant's (or one tenant's) GPU-hours and cost by UTC day or month."""
    return _answer(_rows(db, tenant, period, since, until), period, format, "tuneforge-usage")


@router.get("/prices")
def prices(caller: Reader) -> dict:
    """What a device-hour costs the caller's tenant: the charged price and both list prices per device type."""
    rates, problem = tenant_rates(caller.tenant_id)
    if problem:
        raise ApiError(503, f"the server's price table cannot be read: {problem}", code="price_table_unreadable")
    return {"object": "list", "currency": "usd", "data": [
        {"object": "tuneforge.price", "device": r.device, "market": r.market, "price_per_hour": r.price_per_hour,
         "on_demand": r.on_demand, "spot": r.spot, "source": r.source} for r in rates]}


@router.get("/tenants/{tenant_id}/budget", response_model=TenantBudgetObject)
def get_budget(tenant_id: TenantId, caller: AdminCaller, db: Db) -> TenantBudgetObject:
    with db.read_session() as session:
        if tenant_rows.get_tenant(session, tenant_id=tenant_id) is None:
            raise _no_tenant(tenant_id)
        return _budget(session, tenant_id)


@router.put("/tenants/{tenant_id}/budget", response_model=TenantBudgetObject)
def set_budget(tenant_id: TenantId, body: TenantBudgetRequest, caller: AdminCaller, db: Db) -> TenantBudgetObject:
    """Replace the tenant's monthly budgets: new jobs are checked against them at once, running jobs at
    their worker's next heartbeat."""
    with db.session() as session:
        if tenant_rows.get_tenant(session, tenant_id=tenant_id) is None:
            raise _no_tenant(tenant_id)
        cost_rows.set_budget(session, tenant_id=tenant_id, monthly_cost_usd=body.monthly_cost_usd,
                             monthly_gpu_hours=body.monthly_gpu_hours)
        return _budget(session, tenant_id)


def _no_tenant(tenant_id: str) -> ApiError:
    return ApiError(404, f"No tenant {tenant_id!r}: create it first with POST /v1/tuneforge/tenants",
                    param="tenant_id", code="tenant_not_found")
