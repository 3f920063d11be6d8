"""/v1/tuneforge: admin endpoints (tenants and their limits, API keys, the audit log) and the caller's own usage.

Tenants are created explicitly (POST /tenants) with a validated name; a key or limits for a tenant that
does not exist are refused, so a typo never creates a new tenant. Admin endpoints need the admin scope;
admins are the platform's operators and see every tenant.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import StreamingResponse

from tuneforge.api.auth import KeyCache
from tuneforge.api.dependencies import AdminCaller, Db, Reader
from tuneforge.api.errors import ApiError, not_found
from tuneforge.api.objects import page
from tuneforge.db import audit as audit_rows
from tuneforge.db import jobs as job_rows
from tuneforge.db import quotas
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.tables import ApiKey, AuditRecord, Tenant
from tuneforge.spec.api import (
    TENANT_NAME,
    AuditRecordObject,
    KeyCreated,
    KeyCreateRequest,
    KeyObject,
    ListObject,
    TenantCreateRequest,
    TenantLimits,
    TenantObject,
)

router = APIRouter(prefix="/v1/tuneforge", tags=["tuneforge"])
TenantId = Annotated[str, Path(pattern=TENANT_NAME)]
KeyId = Annotated[str, Path(max_length=40)]


def _no_tenant(tenant_id: str, param: str) -> ApiError:
    return ApiError(404, f"No tenant {tenant_id!r}: create it first with POST /v1/tuneforge/tenants",
                    param=param, code="tenant_not_found")


def _tenant_object(tenant: Tenant) -> TenantObject:
    return TenantObject(id=tenant.id, created_at=tenant.created_at, max_running_jobs=tenant.max_running_jobs,
                        max_gpus=tenant.max_gpus, weight=tenant.weight, max_active_jobs=tenant.max_active_jobs,
                        max_storage_bytes=tenant.max_storage_bytes, requests_per_minute=tenant.requests_per_minute)


def _limits(body: TenantLimits) -> dict:
    return body.model_dump(include=set(TenantLimits.model_fields))


def _key_object(row: ApiKey, cls=KeyObject, **extra) -> KeyObject:
    return cls(id=row.id, tenant=row.tenant_id, name=row.name, admin=row.admin,
               scopes=list(tenant_rows.parse_scopes(row.scopes)), hint=row.hint, created_at=row.created_at,
               expires_at=row.expires_at, revoked_at=row.revoked_at, **extra)


@router.post("/tenants", response_model=TenantObject)
def create_tenant(body: TenantCreateRequest, caller: AdminCaller, db: Db) -> TenantObject:
    with db.session() as session:
        tenant = tenant_rows.create_tenant(session, tenant_id=body.name, **_limits(body))
        if tenant is None:
            raise ApiError(409, f"tenant {body.name!r} exists already", param="name", code="tenant_exists")
        return _tenant_object(tenant)


@router.get("/tenants/{tenant_id}", response_model=TenantObject)
def get_tenant(tenant_id: TenantId, caller: AdminCaller, db: Db) -> TenantObject:
    with db.read_session() as session:
        tenant = tenant_rows.get_tenant(session, tenant_id=tenant_id)
        if tenant is None:
            raise _no_tenant(tenant_id, "tenant_id")
        return _tenant_object(tenant)


@router.put("/tenants/{tenant_id}/limits", response_model=TenantLimits)
def set_limits(tenant_id: TenantId, body: TenantLimits, caller: AdminCaller, db: Db) -> TenantLimits:
    with db.session() as session:
        if tenant_rows.get_tenant(session, tenant_id=tenant_id) is None:
            raise _no_tenant(tenant_id, "tenant_id")
        tenant = tenant_rows.set_tenant_limits(session, tenant_id=tenant_id, **_limits(body))
        return TenantLimits.model_validate({name: getattr(tenant, name) for name in TenantLimits.model_fields})


@router.post("/keys", response_model=KeyCreated)
def create_key(body: KeyCreateRequest, caller: AdminCaller, db: Db) -> KeyCreated:
    """A new key, shown once in `key`; the database keeps only its hash."""
    expires_at = int(time.time()) + body.expires_in if body.expires_in else None
    with db.session() as session:
        if tenant_rows.get_tenant(session, tenant_id=body.tenant) is None:
            raise _no_tenant(body.tenant, "tenant")
        key, secret = tenant_rows.create_api_key(session, tenant_id=body.tenant, name=body.name, admin=body.admin,
                                                 scopes=tuple(body.scopes) if body.scopes is not None else None,
                                                 expires_at=expires_at)
        if not tenant_rows.parse_scopes(key.scopes):
            raise ApiError(400, "scopes: a key needs at least one scope", param="scopes")
        return _key_object(key, KeyCreated, key=secret)


@router.get("/keys", response_model=ListObject)
def list_keys(caller: AdminCaller, db: Db, tenant: str | None = Query(None, pattern=TENANT_NAME)) -> ListObject:
    """Every key (of one tenant with `tenant`), revoked ones included; never a secret."""
    with db.read_session() as session:
        return page([_key_object(key) for key in tenant_rows.list_api_keys(session, tenant_id=tenant)], False)


@router.delete("/keys/{key_id}", response_model=KeyObject)
def revoke_key(key_id: KeyId, request: Request, caller: AdminCaller, db: Db) -> KeyObject:
    """Revoke a key: refused at once by this API process, and by every other within KEY_CACHE_SECONDS."""
    with db.session() as session:
        key = tenant_rows.get_api_key(session, key_id=key_id)
        if key is None:
            raise not_found("API key", key_id, param="key_id")
        tenant_rows.revoke_api_key(session, key_id=key_id)
    cache: KeyCache = request.app.state.key_cache
    cache.forget(key_id)
    return _key_object(key)


def _audit_filter(tenant: str | None, key_id: str | None, action: str | None, object_id: str | None,
                  status: int | None, since: float | None, until: float | None) -> audit_rows.AuditFilter:
    return audit_rows.AuditFilter(tenant_id=tenant, key_id=key_id, action=action, object_id=object_id, status=status,
                                  since=since, until=until)


def _audit_object(row: AuditRecord) -> AuditRecordObject:
    return AuditRecordObject(id=row.id, created_at=row.created_at, tenant=row.tenant_id, key_id=row.key_id,
                             action=row.action, object_id=row.object_id, status=row.status, request_id=row.request_id,
                             source=row.source)


AuditFilters = dict(
    tenant=Query(None, pattern=TENANT_NAME), key_id=Query(None, max_length=40),
    action=Query(None, max_length=160, description="A prefix of 'METHOD /route', e.g. 'DELETE' or 'POST /v1/files'."),
    object_id=Query(None, max_length=255), status=Query(None, ge=100, le=599),
    since=Query(None, ge=0, description="Unix seconds, inclusive."), until=Query(None, ge=0),
)


@router.get("/audit", response_model=ListObject)
def list_audit(caller: AdminCaller, db: Db, tenant: str | None = AuditFilters["tenant"],
               key_id: str | None = AuditFilters["key_id"], action: str | None = AuditFilters["action"],
               object_id: str | None = AuditFilters["object_id"], status: int | None = AuditFilters["status"],
               since: float | None = AuditFilters["since"], until: float | None = AuditFilters["until"],
               after: str | None = Query(None, max_length=40), limit: int = Query(100, ge=1, le=1000)) -> ListObject:
    """The audit log, newest first, filtered; `after` is the last id of the previous page."""
    where = _audit_filter(tenant, key_id, action, object_id, status, since, until)
    with db.read_session() as session:
        rows, more = audit_rows.list_records(session, where=where, limit=limit, after=after)
        return page([_audit_object(row) for row in rows], more)


@router.get("/audit/export")
def export_audit(caller: AdminCaller, db: Db, tenant: str | None = AuditFilters["tenant"],
                 key_id: str | None = AuditFilters["key_id"], action: str | None = AuditFilters["action"],
                 object_id: str | None = AuditFilters["object_id"], status: int | None = AuditFilters["status"],
                 since: float | None = AuditFilters["since"], until: float | None = AuditFilters["until"]
                 ) -> StreamingResponse:
    """The audit log as JSON Lines, oldest first, with the same filters: one record per line."""
    where = _audit_filter(tenant, key_id, action, object_id, status, since, until)

    def lines() -> Iterator[str]:
        with db.read_session() as session:
            for row in audit_rows.iter_records(session, where=where):
                yield _audit_object(row).model_dump_json() + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson",
                             headers={"Content-Disposition": 'attachment; filename="tuneforge-audit.jsonl"'})


@router.get("/usage")
def usage(caller: Reader, db: Db) -> dict:
    """GPU-hours this tenant's jobs have used, by status; its active jobs and stored bytes against its quotas."""
    with db.read_session() as session:
        rows = job_rows.usage_by_status(session, tenant_id=caller.tenant_id)
        tenant = tenant_rows.get_tenant(session, tenant_id=caller.tenant_id)
        active, stored = quotas.active_jobs(session, tenant_id=caller.tenant_id), quotas.stored_bytes(session, tenant_id=caller.tenant_id)
    by_status = {status: {"jobs": count, "gpu_hours": round(seconds / 3600, 4)} for status, (count, seconds) in rows.items()}
    return {"object": "tuneforge.usage", "tenant": caller.tenant_id, "by_status": by_status,
            "gpu_hours": round(sum(v["gpu_hours"] for v in by_status.values()), 4),
            "active_jobs": active, "max_active_jobs": tenant.max_active_jobs if tenant else None,
            "stored_bytes": stored, "max_storage_bytes": tenant.max_storage_bytes if tenant else None}
