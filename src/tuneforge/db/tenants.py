"""Tenants (an organization or project: the owner of every object) and their API keys, stored hashed.

A key is shown once when created; the database keeps only its SHA-256 (keys are 256 random bits, so a
fast hash is as good as a slow one here) and looks it up by that hash.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import API_KEY, new_id, now
from tuneforge.db.tables import ApiKey, Tenant

KEY_PREFIX = "tf-"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def ensure_tenant(session: Session, *, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        tenant = Tenant(id=tenant_id, created_at=now(), weight=1.0)
        session.add(tenant)
        session.flush()
    return tenant


def get_tenant(session: Session, *, tenant_id: str) -> Tenant | None:
    return session.get(Tenant, tenant_id)


def create_tenant(session: Session, *, tenant_id: str, max_running_jobs: int | None = None, max_gpus: int | None = None,
                  weight: float = 1.0) -> Tenant | None:
    """A new tenant, or None when one with this id exists already."""
    if session.get(Tenant, tenant_id) is not None:
        return None
    tenant = Tenant(id=tenant_id, created_at=now(), max_running_jobs=max_running_jobs, max_gpus=max_gpus, weight=weight)
    session.add(tenant)
    session.flush()
    return tenant


def create_api_key(
    session: Session, *, tenant_id: str, name: str = "", admin: bool = False, secret: str | None = None
) -> tuple[ApiKey, str]:
    """A new key for the tenant (created if new); returns the row and the secret, which is not stored.
    `secret` adopts a key chosen elsewhere (TUNEFORGE_ADMIN_KEY); by default one is generated."""
    ensure_tenant(session, tenant_id=tenant_id)
    secret = secret or KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=new_id(API_KEY), tenant_id=tenant_id, key_hash=hash_key(secret), name=name, admin=admin, created_at=now())
    session.add(key)
    session.flush()
    return key, secret


def find_api_key(session: Session, *, secret: str) -> ApiKey | None:
    """The live key with this secret, or None (unknown and revoked keys look the same)."""
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None)))


def revoke_api_key(session: Session, *, key_id: str) -> bool:
    key = session.get(ApiKey, key_id)
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = now()
    return True


def list_api_keys(session: Session, *, tenant_id: str | None = None) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant_id:
        query = query.where(ApiKey.tenant_id == tenant_id)
    return list(session.scalars(query))


def count_api_keys(session: Session, *, admin_only: bool = False) -> int:
    """Live (unrevoked) keys; with admin_only, live admin keys."""
    query = select(func.count()).select_from(ApiKey).where(ApiKey.revoked_at.is_(None))
    if admin_only:
        query = query.where(ApiKey.admin.is_(True))
    return session.scalar(query) or 0


def set_tenant_limits(
    session: Session, *, tenant_id: str, max_running_jobs: int | None, max_gpus: int | None, weight: float = 1.0
) -> Tenant:
    tenant = ensure_tenant(session, tenant_id=tenant_id)
    tenant.max_running_jobs, tenant.max_gpus, tenant.weight = max_running_jobs, max_gpus, weight
    return tenant


def tenants_by_id(session: Session) -> dict[str, Tenant]:
    return {tenant.id: tenant for tenant in session.scalars(select(Tenant))}


def lock_tenant(session: Session, *, tenant_id: str) -> None:
    """Serialize claims of one tenant's jobs while its limits are checked (a row lock on PostgreSQL)."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
