"""The one place errors become HTTP responses: a typed error's status code, one JSON shape."""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return error_response(400, "invalid_request", problems)
