"""/v1/tuneforge: admin endpoints (create API keys, set tenant limits) and the caller's own usage."""

from __future__ import annotations

from fastapi import APIRouter
from tuneforge.api.auth import require_admin
from tuneforge.api.dependencies import Caller, Db
from tuneforge.db import tenants as tenant_rows
from tuneforge.db import jobs as job_rows
from tuneforge.spec.api import KeyCreated, KeyCreateRequest, TenantLimits

router = APIRouter(prefix="/v1/tuneforge", tags=["tuneforge"])


@router.post("/keys", response_model=KeyCreated)
def create_key(body: KeyCreateRequest, caller: Caller, db: Db) -> KeyCreated:
    require_admin(caller)
    with db.session() as session:
        key, secret = tenant_rows.create_api_key(session, tenant_id=body.tenant, name=body.name, admin=body.admin)
        return KeyCreated(id=key.id, tenant=key.tenant_id, name=key.name, admin=key.admin, key=secret)


@router.put("/tenants/{tenant_id}/limits", response_model=TenantLimits)
def set_limits(tenant_id: str, body: TenantLimits, caller: Caller, db: Db) -> TenantLimits:
    require_admin(caller)
    with db.session() as session:
        tenant = tenant_rows.set_tenant_limits(session, tenant_id=tenant_id, max_running_jobs=body.max_running_jobs,
                                               max_gpus=body.max_gpus, weight=body.weight)
        return TenantLimits(max_running_jobs=tenant.max_running_jobs, max_gpus=tenant.max_gpus, weight=tenant.weight)


@router.get("/usage")
def usage(caller: Caller, db: Db) -> dict:
    """GPU-hours this tenant's jobs have used, by status."""
    with db.session() as session:
        rows = job_rows.usage_by_status(session, tenant_id=caller.tenant_id)
    by_status = {status: {"jobs": count, "gpu_hours": round(seconds / 3600, 4)} for status, (count, seconds) in rows.items()}
    return {"object": "tuneforge.usage", "tenant": caller.tenant_id, "by_status": by_status,
            "gpu_hours": round(sum(v["gpu_hours"] for v in by_status.values()), 4)}
