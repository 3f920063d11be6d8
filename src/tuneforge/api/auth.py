"""Bearer API keys: every request names its tenant through its key; admin keys may also manage keys
and tenants. Lookups are cached briefly, so a revoked key stops working within KEY_CACHE_SECONDS."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from fastapi import Request

from tuneforge.api.errors import ApiError
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.tenants import hash_key

KEY_CACHE_SECONDS = 10.0


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str
    admin: bool


class KeyCache:
    def __init__(self):
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Principal, float]] = {}

    def get(self, digest: str) -> Principal | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry and entry[1] > time.monotonic():
                return entry[0]
            self._entries.pop(digest, None)
            return None

    def put(self, digest: str, principal: Principal) -> None:
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[digest] = (principal, time.monotonic() + KEY_CACHE_SECONDS)


def authenticate(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(401, "You didn't provide an API key: send 'Authorization: Bearer YOUR_KEY' "
                            "(create one with `tuneforge keys create --tenant NAME`)", code="missing_api_key")
    secret = secret.strip()
    cache: KeyCache = request.app.state.key_cache
    digest = hash_key(secret)
    principal = cache.get(digest)
    if principal is None:
        with request.app.state.db.session() as session:
            key = tenant_rows.find_api_key(session, secret=secret)
            if key is None:
                raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")
            principal = Principal(tenant_id=key.tenant_id, key_id=key.id, admin=key.admin)
        cache.put(digest, principal)
    return principal


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise ApiError(403, "this endpoint needs an admin key", code="forbidden", type="permission_error")
