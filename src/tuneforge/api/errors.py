"""Errors in the OpenAI shape, {"error": {"message", "type", "param", "code"}}, for every failure the API
returns: our own, FastAPI's request validation, unknown routes and unexpected exceptions alike."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tuneforge.api")

INVALID_REQUEST = "invalid_request_error"


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = INVALID_REQUEST, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers  # e.g. Retry-After on a 429


def not_found(what: str, object_id: str, *, param: str) -> ApiError:
    """The same answer for a missing id and for another tenant's id."""
    return ApiError(404, f"No {what} found with id {object_id!r}", param=param, code="not_found")


def error_response(status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {**({"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}), **(exc.headers or {})} or None
        return error_response(exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
        # pydantic reports union members as extra loc parts (e.g. 'int', 'literal['auto']'); drop them.
        loc = [part for part in loc if not part.startswith(("literal[", "int", "float", "str", "function-"))]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            # pydantic's loc is ("body", character offset): an offset is not a parameter.
            offset = loc[0] if loc and loc[0].isdigit() else None
            detail = (first.get("ctx") or {}).get("error")
            message = "the request body is not valid JSON" + (f" ({detail} at character {offset})" if offset else "")
            return error_response(400, message, param=None, code="invalid_json")
        if first.get("type") == "extra_forbidden":
            message = "unknown parameter"
        elif first.get("type") == "missing":
            message = "required parameter is missing"
        return error_response(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = "no such endpoint" if exc.status_code == 404 and exc.detail == "Not Found" else str(exc.detail)
        return error_response(exc.status_code, message, code=code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "the server failed to handle this request", type="server_error", code="internal_error")
