"""/v1/tuneforge: admin endpoints (create tenants and API keys, set tenant limits) and the caller's own usage.

Tenants are created explicitly (POST /tenants) with a validated name; a key or limits for a tenant that
does not exist are refused, so a typo never creates a new tenant.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from tuneforge.api.auth import require_admin
from tuneforge.api.dependencies import Caller, Db
from tuneforge.api.errors import ApiError
from tuneforge.db import jobs as job_rows
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.tables import Tenant
from tuneforge.spec.api import TENANT_NAME, KeyCreated, KeyCreateRequest, TenantCreateRequest, TenantLimits, TenantObject

router = APIRouter(prefix="/v1/tuneforge", tags=["tuneforge"])
TenantId = Annotated[str, Path(pattern=TENANT_NAME)]


def _no_tenant(tenant_id: str, param: str) -> ApiError:
    return ApiError(404, f"No tenant {tenant_id!r}: create it first with POST /v1/tuneforge/tenants",
                    param=param, code="tenant_not_found")


def _tenant_object(tenant: Tenant) -> TenantObject:
    return TenantObject(id=tenant.id, created_at=tenant.created_at, max_running_jobs=tenant.max_running_jobs,
                        max_gpus=tenant.max_gpus, weight=tenant.weight)


@router.post("/tenants", response_model=TenantObject)
def create_tenant(body: TenantCreateRequest, caller: Caller, db: Db) -> TenantObject:
    require_admin(caller)
    with db.session() as session:
        tenant = tenant_rows.create_tenant(session, tenant_id=body.name, max_running_jobs=body.max_running_jobs,
                                           max_gpus=body.max_gpus, weight=body.weight)
        if tenant is None:
            raise ApiError(409, f"tenant {body.name!r} exists already", param="name", code="tenant_exists")
        return _tenant_object(tenant)


@router.post("/keys", response_model=KeyCreated)
def create_key(body: KeyCreateRequest, caller: Caller, db: Db) -> KeyCreated:
    require_admin(caller)
    with db.session() as session:
        if tenant_rows.get_tenant(session, tenant_id=body.tenant) is None:
            raise _no_tenant(body.tenant, "tenant")
        key, secret = tenant_rows.create_api_key(session, tenant_id=body.tenant, name=body.name, admin=body.admin)
        return KeyCreated(id=key.id, tenant=key.tenant_id, name=key.name, admin=key.admin, key=secret)


@router.put("/tenants/{tenant_id}/limits", response_model=TenantLimits)
def set_limits(tenant_id: TenantId, body: TenantLimits, caller: Caller, db: Db) -> TenantLimits:
    require_admin(caller)
    with db.session() as session:
        if tenant_rows.get_tenant(session, tenant_id=tenant_id) is None:
            raise _no_tenant(tenant_id, "tenant_id")
        tenant = tenant_rows.set_tenant_limits(session, tenant_id=tenant_id, max_running_jobs=body.max_running_jobs,
                                               max_gpus=body.max_gpus, weight=body.weight)
        return TenantLimits(max_running_jobs=tenant.max_running_jobs, max_gpus=tenant.max_gpus, weight=tenant.weight)


@router.get("/usage")
def usage(caller: Caller, db: Db) -> dict:
    """GPU-hours this tenant's jobs have used, by status."""
    with db.read_session() as session:
        rows = job_rows.usage_by_status(session, tenant_id=caller.tenant_id)
    by_status = {status: {"jobs": count, "gpu_hours": round(seconds / 3600, 4)} for status, (count, seconds) in rows.items()}
    return {"object": "tuneforge.usage", "tenant": caller.tenant_id, "by_status": by_status,
            "gpu_hours": round(sum(v["gpu_hours"] for v in by_status.values()), 4)}
