"""The one place errors become HTTP responses: a typed error's status code, one JSON shape."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from prefixserve.errors import EngineOverloadedError, PrefixServeError


def error_response(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PrefixServeError)
    async def _typed(_: Request, exc: PrefixServeError) -> JSONResponse:
        headers = None
        if isinstance(exc, EngineOverloadedError):
            headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
        return error_response(exc.status_code, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return error_response(400, "invalid_request", problems)
