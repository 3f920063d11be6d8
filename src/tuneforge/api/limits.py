"""A bound on request bodies: JSON requests are small, so a body past the limit is refused on its
Content-Length before it is read, or as soon as the streamed bytes pass it (chunked requests).

Uploads (`POST /v1/files`, the parts of `/v1/uploads`) stream into the artifact store under their own,
larger limits.
"""

from __future__ import annotations

import json

MAX_JSON_BODY_BYTES = 1 << 20


class BodyLimit:
    """ASGI middleware: 413 in the OpenAI error shape for a body over `max_bytes` (exempt: uploads, as
    (method, path) pairs where a path segment "*" stands for any one segment, e.g. an id)."""

    def __init__(self, app, *, max_bytes: int = MAX_JSON_BODY_BYTES, exempt: tuple[tuple[str, str], ...] = ()):
        self.app, self.max_bytes = app, max_bytes
        self.exempt = [(method, path.strip("/").split("/")) for method, path in exempt]

    def _exempt(self, method: str, path: str) -> bool:
        segments = path.strip("/").split("/")
        return any(method == m and len(segments) == len(p) and all(a == "*" or a == b for a, b in zip(p, segments))
                   for m, p in self.exempt)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._exempt(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        seen, refused = 0, False

        async def limited_receive():
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes and not refused:
                    # Answer now and stop reading; the app sees a disconnect and its reply is dropped.
                    refused = True
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"error": {
            "message": f"the request body is larger than this endpoint accepts ({self.max_bytes:,} bytes)",
            "type": "invalid_request_error", "param": None, "code": "request_too_large"}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
