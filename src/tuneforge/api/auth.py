"""Bearer API keys: every request names its tenant through its key, and every route declares the scope
it needs (read, jobs, files, admin); a key without it gets a 403. Expired keys are refused on every
request; each authenticated request also spends a token of the key's rate limit (api/rate_limit.py).

Lookups are cached for KEY_CACHE_SECONDS. A key revoked through this process is dropped from its cache
at once; other API processes stop accepting it within KEY_CACHE_SECONDS (their cached entry runs out).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi import routing
from fastapi.routing import APIRoute

from tuneforge.api.errors import ApiError
from tuneforge.db import tenants as tenant_rows
from tuneforge.db.tenants import hash_key, well_formed

KEY_CACHE_SECONDS = 2.0
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str
    scopes: frozenset[str]
    expires_at: int | None = None
    requests_per_minute: int | None = None  # the tenant's; None: the server's default

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes


class KeyCache:
    def __init__(self, ttl: float = KEY_CACHE_SECONDS):
        self.ttl = ttl
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
            self._entries[digest] = (principal, time.monotonic() + self.ttl)

    def forget(self, key_id: str) -> None:
        """Drop a key at once (it was revoked here): the next request with it reads the database."""
        with self._lock:
            for digest in [d for d, (p, _) in self._entries.items() if p.key_id == key_id]:
                del self._entries[digest]


def _invalid() -> ApiError:
    return ApiError(401, "Incorrect API key provided", code="invalid_api_key")


def authenticate(request: Request) -> Principal:
    """The caller's key, checked (well formed, live, not expired) and charged one request of its rate."""
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(401, "You didn't provide an API key: send 'Authorization: Bearer YOUR_KEY' "
                            "(create one with `tuneforge keys create --tenant NAME`)", code="missing_api_key")
    secret = secret.strip()
    if not well_formed(secret):  # a typo'd or made-up key costs no database read
        raise _invalid()
    cache: KeyCache = request.app.state.key_cache
    digest = hash_key(secret)
    principal = cache.get(digest)
    if principal is None:
        with request.app.state.db.read_session() as session:
            found = tenant_rows.find_api_key(session, secret=secret)
            if found is None:
                raise _invalid()
            key, tenant = found
            principal = Principal(tenant_id=key.tenant_id, key_id=key.id,
                                  scopes=frozenset(tenant_rows.parse_scopes(key.scopes)), expires_at=key.expires_at,
                                  requests_per_minute=tenant.requests_per_minute)
        cache.put(digest, principal)
    if principal.expires_at is not None and principal.expires_at <= time.time():
        raise ApiError(401, f"This API key expired at {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(principal.expires_at))}",
                       code="expired_api_key")
    request.state.principal = principal  # for the audit log
    request.app.state.rate_limiter.check(principal.key_id, per_minute=principal.requests_per_minute)
    return principal


def method_scope(method: str) -> str:
    """The scope of a route that declares none: read for reads, jobs for anything that changes state."""
    return "read" if method.upper() in SAFE_METHODS else "jobs"


class RequireScope:
    """A dependency: the authenticated caller, if its key holds `scope` (None: the method's scope)."""

    def __init__(self, scope: str | None = None):
        if scope is not None and scope not in tenant_rows.SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        self.scope = scope

    def __call__(self, request: Request) -> Principal:
        principal = authenticate(request)
        needed = self.scope or method_scope(request.method)
        if needed not in principal.scopes:
            raise ApiError(403, f"this API key lacks the {needed!r} scope this endpoint needs "
                                f"(it has: {', '.join(sorted(principal.scopes)) or 'none'})",
                           code="insufficient_scope", type="permission_error")
        return principal


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise ApiError(403, "this endpoint needs an admin key", code="insufficient_scope", type="permission_error")


def api_routes(app: FastAPI) -> Iterator[tuple[str, APIRoute]]:
    """(path as the OpenAPI document writes it, route) of every API route, included routers flattened."""
    contexts = routing.iter_route_contexts(app.routes) if hasattr(routing, "iter_route_contexts") else app.routes
    for context in contexts:
        route = getattr(context, "original_route", context)
        if isinstance(route, APIRoute):
            yield getattr(context, "path_format", route.path_format), route


def route_scope(route: APIRoute, method: str) -> str | None:
    """The scope a route needs (None: it needs no key), read from its dependencies."""
    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop()
        if isinstance(dependant.call, RequireScope):
            return dependant.call.scope or method_scope(method)
        if dependant.call is authenticate:
            return method_scope(method)
        pending.extend(dependant.dependencies)
    return None


def document_scopes(app: FastAPI) -> None:
    """Name each operation's scope in the OpenAPI document (`x-tuneforge-scope`), where clients and the
    security tests read it."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        for path, route in api_routes(app):
            for method in route.methods:
                operation = schema.get("paths", {}).get(path, {}).get(method.lower())
                scope = route_scope(route, method)
                if operation is not None and scope is not None:
                    operation["x-tuneforge-scope"] = scope
        return schema

    app.openapi = openapi
