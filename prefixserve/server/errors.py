"""The one place errors become HTTP responses: a typed error's status code, one JSON shape."""

from __future__ import annotations

import re
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefixserve.errors import PrefixServeError, TaskNotFoundError

_NAMESPACED = re.compile(r"'[^'/]+/")  # "'tenant/" at the start of a quoted engine task name


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PrefixServeError)
    async def _typed(_: Request, exc: PrefixServeError) -> JSONResponse:
        message = exc.message
        if isinstance(exc, TaskNotFoundError):  # callers name tasks without their tenant namespace
            message = _NAMESPACED.sub("'", message)
        headers = None
        retry_after = getattr(exc, "retry_after_s", None)  # overload and store outages: come back soon
        if retry_after is not None:
            headers = {"Retry-After": str(max(1, round(retry_after)))}
        return error_response(exc.status_code, exc.code, message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes, wrong methods, bodies the framework cannot parse: the same error shape."""
        if isinstance(exc.__cause__, PrefixServeError):  # FastAPI wraps what reading the body raised (a 408)
            return await _typed(request, exc.__cause__)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        return error_response(exc.status_code, kind, _unparsable_body(exc) or str(exc.detail), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid_request", "; ".join(_problem(e) for e in exc.errors()))

    build_openapi = app.openapi

    def openapi() -> dict:
        """Validation errors are 400s (routes document them), never FastAPI's default 422."""
        schema = build_openapi()
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi


def _unparsable_body(exc: StarletteHTTPException) -> str | None:
    """FastAPI answers a body that json.loads raised on with a bare "error parsing the body"; say why."""
    cause = exc.__cause__
    if exc.status_code != 400 or cause is None:
        return None
    if isinstance(cause, RecursionError):
        return (f"body: expected JSON nested at most about {sys.getrecursionlimit()} levels deep, found deeper "
                f"nesting ({cause})")
    if isinstance(cause, UnicodeDecodeError):
        return f"body: expected UTF-8 JSON, found invalid UTF-8 ({cause})"
    return None


def _problem(error: dict) -> str:
    if error["type"] == "json_invalid":
        return (f"body: expected JSON, found invalid JSON at character {error['loc'][-1]} "
                f"({error.get('ctx', {}).get('error', 'parse error')})")
    return f"{'.'.join(str(p) for p in error['loc'][1:]) or 'body'}: {error['msg']}"
