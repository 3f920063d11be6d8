"""Tenants (an organization or project: the owner of every object) and their API keys, stored hashed.

A key is shown once when created; the database keeps only its SHA-256 (keys are 238 random bits, so a
fast hash is as good as a slow one here) and looks it up by that hash. Keys look like
`tf_live_<40 base62>_<6 base62>`: the typed prefix lets secret scanners find a leaked key, and the
CRC32 checksum at the end lets them (and the API, before any database read) tell a key from noise.
Keys made before this format (`tf-...`, or any TUNEFORGE_ADMIN_KEY) keep working by their hash.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tuneforge.db.identifiers import API_KEY, new_id, now
from tuneforge.db.tables import ApiKey, Tenant

KEY_PREFIX = "tf_live_"
SCOPES = ("read", "jobs", "files", "admin")
DEFAULT_SCOPES = ("read", "jobs", "files")
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_RANDOM_CHARS, _CHECKSUM_CHARS = 40, 6  # 62**40 ~ 2**238; 62**6 > 2**32 holds any CRC32
_KEY_SHAPE = re.compile(rf"{KEY_PREFIX}([0-9A-Za-z]{{{_RANDOM_CHARS}}})_([0-9A-Za-z]{{{_CHECKSUM_CHARS}}})")
HINT_CHARS = len(KEY_PREFIX) + 4  # what lists show of a key: "tf_live_AbC4"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _checksum(body: str) -> str:
    value, out = zlib.crc32(body.encode("ascii")), ""
    for _ in range(_CHECKSUM_CHARS):
        value, digit = divmod(value, 62)
        out = BASE62[digit] + out
    return out


def generate_secret() -> str:
    body = KEY_PREFIX + "".join(secrets.choice(BASE62) for _ in range(_RANDOM_CHARS))
    return f"{body}_{_checksum(body)}"


def well_formed(secret: str) -> bool:
    """Whether a secret could be a key: a typed key must carry its checksum; older formats cannot be checked."""
    if not secret.startswith(KEY_PREFIX):
        return True
    match = _KEY_SHAPE.fullmatch(secret)
    return match is not None and _checksum(KEY_PREFIX + match.group(1)) == match.group(2)


def parse_scopes(text: str) -> tuple[str, ...]:
    return tuple(scope for scope in text.split() if scope in SCOPES)


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
                  weight: float = 1.0, max_active_jobs: int | None = None, max_storage_bytes: int | None = None,
                  requests_per_minute: int | None = None) -> Tenant | None:
    """A new tenant, or None when one with this id exists already."""
    if session.get(Tenant, tenant_id) is not None:
        return None
    tenant = Tenant(id=tenant_id, created_at=now(), max_running_jobs=max_running_jobs, max_gpus=max_gpus, weight=weight,
                    max_active_jobs=max_active_jobs, max_storage_bytes=max_storage_bytes,
                    requests_per_minute=requests_per_minute)
    session.add(tenant)
    session.flush()
    return tenant


def create_api_key(
    session: Session, *, tenant_id: str, name: str = "", admin: bool = False, secret: str | None = None,
    scopes: tuple[str, ...] | None = None, expires_at: int | None = None,
) -> tuple[ApiKey, str]:
    """A new key for the tenant (created if new); returns the row and the secret, which is not stored.
    `scopes` defaults to read, jobs and files; `admin` adds the admin scope. `secret` adopts a key chosen
    elsewhere (TUNEFORGE_ADMIN_KEY); by default one is generated."""
    ensure_tenant(session, tenant_id=tenant_id)
    if secret is not None and not well_formed(secret):
        raise ValueError(f"a key starting with {KEY_PREFIX!r} must end with its checksum; generate one instead")
    secret = secret or generate_secret()
    chosen = set(DEFAULT_SCOPES if scopes is None else scopes) | ({"admin"} if admin else set())
    unknown = sorted(chosen - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; expected some of {', '.join(SCOPES)}")
    key = ApiKey(id=new_id(API_KEY), tenant_id=tenant_id, key_hash=hash_key(secret), name=name,
                 admin="admin" in chosen, scopes=" ".join(s for s in SCOPES if s in chosen), expires_at=expires_at,
                 hint=secret[:HINT_CHARS], created_at=now())
    session.add(key)
    session.flush()
    return key, secret


def find_api_key(session: Session, *, secret: str) -> tuple[ApiKey, Tenant] | None:
    """The live key with this secret and its tenant, or None (unknown and revoked keys look the same;
    an expired one is returned, so the caller can say so)."""
    row = session.execute(
        select(ApiKey, Tenant).join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None))
    ).first()
    return None if row is None else (row[0], row[1])


def get_api_key(session: Session, *, key_id: str) -> ApiKey | None:
    return session.get(ApiKey, key_id)


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
    session: Session, *, tenant_id: str, max_running_jobs: int | None, max_gpus: int | None, weight: float = 1.0,
    max_active_jobs: int | None = None, max_storage_bytes: int | None = None, requests_per_minute: int | None = None,
) -> Tenant:
    """Replace the tenant's limits (None: unlimited; requests_per_minute None: the server's default)."""
    tenant = ensure_tenant(session, tenant_id=tenant_id)
    tenant.max_running_jobs, tenant.max_gpus, tenant.weight = max_running_jobs, max_gpus, weight
    tenant.max_active_jobs, tenant.max_storage_bytes = max_active_jobs, max_storage_bytes
    tenant.requests_per_minute = requests_per_minute
    return tenant


def tenants_by_id(session: Session) -> dict[str, Tenant]:
    return {tenant.id: tenant for tenant in session.scalars(select(Tenant))}


def lock_tenant(session: Session, *, tenant_id: str) -> None:
    """Serialize claims of one tenant's jobs while its limits are checked (a row lock on PostgreSQL)."""
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
