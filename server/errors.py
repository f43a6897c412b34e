"""Server errors and their JSON responses: ``{"error": {"type", "message", "traceback"?}}``."""

from __future__ import annotations

import logging
import traceback as tb

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

__all__ = ["ApiError", "error_body", "install_handlers"]

log = logging.getLogger("statehost.server")


class ApiError(Exception):
    """An error the server answers with ``status`` and a JSON body.

    ``type`` is the name of the client exception it maps to; ``extra`` adds
    fields next to ``type`` / ``message`` (for example ``exception_type``).
    """

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        *,
        traceback: str | None = None,
        **extra: object,
    ):
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.traceback = traceback
        self.extra = extra

    def body(self) -> dict[str, object]:
        return error_body(self.type, self.message, self.traceback, **self.extra)


def error_body(
    type: str, message: str, traceback: str | None = None, **extra: object
) -> dict[str, object]:
    error: dict[str, object] = {"type": type, "message": message, **extra}
    if traceback is not None:
        error["traceback"] = traceback
    return {"error": error}


def install_handlers(app: FastAPI) -> None:
    """Maps every exception to the one JSON error shape."""

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = {401: "AuthError", 404: "NotFound", 405: "MethodNotAllowed"}.get(
            exc.status_code, "HTTPError"
        )
        return JSONResponse(
            error_body(kind, f"{request.method} {request.url.path}: {exc.detail}"),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return JSONResponse(
            error_body(
                "ValidationError",
                f"{request.method} {request.url.path}: invalid request ({problems}). "
                "Fix the request to match the schema at /docs.",
            ),
            status_code=422,
        )

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(
                "ServerError",
                f"{request.method} {request.url.path}: internal server error "
                f"({type(exc).__name__}: {exc}). The server keeps serving; please report this.",
                "".join(tb.format_exception(exc)),
            ),
            status_code=500,
        )
