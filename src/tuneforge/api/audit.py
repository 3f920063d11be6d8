"""Request ids and the audit log of the API: every response carries `X-Request-ID` (the client's, when it
sent a sane one), and every call that may change state (any method but GET, HEAD, OPTIONS) is recorded,
refused ones included, before its answer leaves: who (key id), tenant, action (method and route), the
object (the path's id, or the id of the object created), the status, the request id, the source address.

The record is built from the route and the answer's `id` alone: no header, no body, no secret.
"""

from __future__ import annotations

import json
import logging
import re
import secrets

import anyio

from tuneforge.api.auth import SAFE_METHODS
from tuneforge.db import audit
from tuneforge.db.session import Database

log = logging.getLogger("tuneforge.api.audit")
REQUEST_ID_HEADER = b"x-request-id"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_MAX_ID_BODY = 1 << 20  # answers this small are read for the id of what they created


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            text = value.decode("latin-1")
            if _SANE_REQUEST_ID.fullmatch(text):
                return text
    return "req_" + secrets.token_hex(12)


class AuditLog:
    """ASGI middleware: the request id on every response, an audit record for every mutating call."""

    def __init__(self, app, *, db: Database):
        self.app, self.db = app, db

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = request_id_of(scope.get("headers") or [])
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        audited = scope["method"].upper() not in SAFE_METHODS
        start: dict | None = None
        recorded = False

        async def write(status: int, body: bytes | None) -> None:
            nonlocal recorded
            recorded = True
            try:
                await anyio.to_thread.run_sync(self._record, scope, state, status, body)
            except Exception:  # noqa: BLE001 - the call happened: answer it, and say loudly what was lost
                log.exception("could not write the audit record of %s %s (request %s)", scope["method"],
                              scope.get("path"), request_id)

        async def audited_send(message):
            nonlocal start
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  (REQUEST_ID_HEADER, request_id.encode("latin-1"))]}
                if audited:
                    start = message  # held back until the record is written
                    return
            elif message["type"] == "http.response.body" and audited and start is not None:
                final = not message.get("more_body", False)
                if not recorded:
                    body = message.get("body", b"") if final and len(message.get("body", b"")) <= _MAX_ID_BODY else None
                    with anyio.CancelScope(shield=True):
                        await write(start["status"], body)
                held, start = start, None
                await send(held)
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except BaseException:
            if audited and not recorded:
                with anyio.CancelScope(shield=True):
                    await write(500, None)
            raise

    def _record(self, scope: dict, state: dict, status: int, body: bytes | None) -> None:
        route = scope.get("route")
        template = getattr(route, "path", None) or scope.get("path", "")
        principal = state.get("principal")
        client = scope.get("client")
        with self.db.session() as session:
            audit.record(
                session, tenant_id=principal.tenant_id if principal else None,
                key_id=principal.key_id if principal else None, action=f"{scope['method'].upper()} {template}",
                object_id=_object_id(scope, status, body), status=status, request_id=state["request_id"],
                source=client[0] if client else None,
            )


def _object_id(scope: dict, status: int, body: bytes | None) -> str | None:
    """The id the path names (its last parameter), else the id of the object the call created."""
    params = scope.get("path_params") or {}
    if params:
        return str(list(params.values())[-1])
    if status < 400 and body:
        try:
            value = json.loads(body)
        except ValueError:
            return None
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            return value["id"]
    return None
