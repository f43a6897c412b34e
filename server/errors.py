"""Server errors: one exception class per error kind, and the one JSON error shape.

Every error the server answers is ``{"error": {"type", "message", "traceback"?, ...}}``
with the status of its kind in ``statehost.wire.ERROR_KINDS``, the table the
client reads too. Raise the class, never a status and a string::

    raise StateNotFoundError(f"{where}: no state {state_id}.", missing=[state_id])

Handlers are dispatched by the exception's class (Starlette walks the MRO):
``ApiError`` and its subclasses answer themselves, ``WireError`` from the core is a
``ProtocolError``, Starlette's own HTTP errors get the kind of their status, a
client that hung up mid-request is one info line, and anything else is a
``ServerError`` (500) with its traceback.
"""

from __future__ import annotations

import json
import logging
import math
import traceback as tb
from typing import TYPE_CHECKING, ClassVar

from statehost._errors import WireError, brief
from statehost.wire import ERROR_KINDS

if TYPE_CHECKING:  # FastAPI loads with create_app only: the CLI's token commands need none
    from fastapi import FastAPI, Request

__all__ = [
    "ERROR_CLASSES",
    "ApiError",
    "ArrayNotFoundError",
    "AuthError",
    "CallCancelledError",
    "CallNotFoundError",
    "CallNotRunError",
    "CallTimeoutError",
    "ClusterUnavailableError",
    "DeviceMemoryError",
    "ForbiddenError",
    "GroupUnsupportedError",
    "FunctionNotCachedError",
    "JobCancelledError",
    "JobNotDoneError",
    "JobNotFoundError",
    "MethodNotAllowedError",
    "NameConflictError",
    "NotFoundError",
    "PayloadError",
    "PayloadTooLargeError",
    "PreconditionFailedError",
    "ProtocolError",
    "QuotaExceededError",
    "RemoteExecutionError",
    "ServerError",
    "SessionNotFoundError",
    "StateConflictError",
    "StateDamagedError",
    "StateNotFoundError",
    "StorageError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "VersionMismatchError",
    "error_body",
    "install_handlers",
]

log = logging.getLogger("statehost.server")

#: kind name -> the server's exception class for it (filled as the classes are defined).
ERROR_CLASSES: dict[str, type[ApiError]] = {}


class ApiError(Exception):
    """An error the server answers with its kind's status and a JSON body.

    ``extra`` adds fields next to ``type`` / ``message`` (``missing``, ``conflicts``...).
    """

    type: ClassVar[str] = "ServerError"
    status: ClassVar[int] = 500

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.type = cls.__name__
        cls.status = ERROR_KINDS[cls.type].status  # a KeyError here: add the kind to the table
        ERROR_CLASSES[cls.type] = cls

    def __init__(self, message: str, *, traceback: str | None = None, **extra: object):
        super().__init__(message)
        self.message = message
        self.traceback = traceback
        self.extra = extra

    def body(self) -> dict[str, object]:
        """The error as JSON-safe data: its fields often echo what a peer sent (a state id
        that is bytes, a NaN), and a job's events, the call stream and the HTTP handler all
        encode it."""
        body = _json_safe(error_body(self.type, self.message, self.traceback, **self.extra))
        assert isinstance(body, dict)
        return body


class ProtocolError(ApiError):
    """A malformed frame, header or request."""


class PayloadError(ApiError):
    """A pickle the server could not load (``missing_module`` when a module was missing)."""


class VersionMismatchError(ApiError):
    """Client and server cannot exchange pickles."""


class AuthError(ApiError):
    """No token, or one the server does not accept (401)."""


class ForbiddenError(ApiError):
    """The token's scope does not allow this (403)."""


class NotFoundError(ApiError):
    """No such name, route or object visible to this token."""


class SessionNotFoundError(ApiError):
    """No such open session for this token."""


class StateNotFoundError(ApiError):
    """No such state visible to this session (``missing`` lists the ids)."""


class CallNotFoundError(ApiError):
    """No queued or running call with that id visible to this token (another principal's
    call answers exactly like a finished or unknown one)."""


class ArrayNotFoundError(ApiError):
    """No such array kept on the server for this session (``missing`` lists the names)."""


class MethodNotAllowedError(ApiError):
    """The route does not take this method."""


class CallTimeoutError(ApiError):
    """A call waited past its deadline and was dropped before it started: nothing was
    applied (``waited_s``, ``timeout_s``)."""


class FunctionNotCachedError(ApiError):
    """The server no longer has that callable: send the function section again."""


class StateConflictError(ApiError):
    """An upload based on an outdated version (``conflicts`` lists them); nothing applied."""


class StateDamagedError(ApiError):
    """A named state that could not be loaded."""


class NameConflictError(ApiError):
    """A state that already belongs to another name."""


class CallCancelledError(ApiError):
    """The call was cancelled before it started: nothing was applied."""


class CallNotRunError(ApiError):
    """A call queued behind a failed call of the same client stream: not run."""


class PreconditionFailedError(ApiError):
    """``If-Match`` names another version than the current one."""


class PayloadTooLargeError(ApiError):
    """A body over the server's limit."""


class UnsupportedMediaTypeError(ApiError):
    """A body of the wrong content type."""


class ValidationError(ApiError):
    """A well-formed request with invalid values."""


class RemoteExecutionError(ApiError):
    """The user's function raised; ``exception_type`` / ``exception_module`` name its class
    (the client raises an instance of that class too), ``exception_message`` is its text."""


class ServerError(ApiError):
    """A fault of the server itself."""


class StorageError(ApiError):
    """The server could not write to its disk; the request was not applied."""


class JobNotFoundError(ApiError):
    """No such job visible to this token (another principal's job is none)."""


class JobNotDoneError(ApiError):
    """The job is queued or running: its result is not there yet (``status``, ``done``)."""


class JobCancelledError(ApiError):
    """The job was cancelled or timed out between steps (``reason``, ``completed``)."""


class DeviceMemoryError(ApiError):
    """The call does not fit in the free memory of its devices (it waited for memory past
    its deadline, or needs more than a device has), or XLA ran out of device memory while
    it ran; it was not applied (``estimate_bytes``, ``free_bytes``, ``device``)."""


class QuotaExceededError(ApiError):
    """The request would take a namespace past one of its quotas (``namespace``, ``quota``,
    ``limit``, ``used``, ``requested``, ``largest``); nothing was applied."""


class ClusterUnavailableError(ApiError):
    """A process of the server's ``jax.distributed`` group is lost (``processes``: their
    indices); nothing new runs until the group is restarted (``server/cluster.py``)."""


class GroupUnsupportedError(ApiError):
    """The request is not run on a server spanning several processes (yet): only what
    every process can replay is (``server/cluster.py``, ``MIRRORED``)."""


assert set(ERROR_CLASSES) == set(ERROR_KINDS), set(ERROR_KINDS) ^ set(ERROR_CLASSES)

# Starlette raises these for routing and body problems; every other status is a ProtocolError.
_HTTP_KINDS: dict[int, type[ApiError]] = {
    401: AuthError, 403: ForbiddenError, 404: NotFoundError, 405: MethodNotAllowedError,
    413: PayloadTooLargeError, 415: UnsupportedMediaTypeError, 422: ValidationError,
}


def error_body(
    type: str, message: str, traceback: str | None = None, **extra: object
) -> dict[str, object]:
    error: dict[str, object] = {"type": type, "message": message, **extra}
    if traceback is not None:
        error["traceback"] = traceback
    return {"error": error}


def _json_safe(value: object, depth: int = 0) -> object:
    """``value`` as plain JSON: fields often echo what a peer sent (its versions, a state
    id), and a NaN, bytes or another object there made the error handler itself raise."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth < 8 and isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if depth < 8 and isinstance(value, list | tuple):
        return [_json_safe(v, depth + 1) for v in value]
    return brief(value)


def render_error(body: dict[str, object]) -> bytes:
    """An error body as JSON bytes. ASCII escapes keep a lone surrogate (a ``\\ud800`` the
    sender chose) renderable: UTF-8 refuses it, which turned a 4xx into a bare 500."""
    return json.dumps(_json_safe(body), ensure_ascii=True, separators=(",", ":")).encode()


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route of the app takes on this request's path."""
    from starlette.routing import Match

    def routes(found: list[object]) -> list[object]:
        # FastAPI 0.16x keeps an included router as one route (``original_router``).
        flat = []
        for route in found:
            inner = getattr(route, "original_router", None)
            flat += routes(inner.routes) if inner is not None else [route]
        return flat

    methods: set[str] = set()
    for route in routes(request.app.routes):
        # PARTIAL: the path matched and the method did not; FULL: both did.
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_handlers(app: FastAPI) -> None:
    """Maps every exception to the one JSON error shape."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect

    class JSONResponse(JSONResponse):  # noqa: F811  every error answer goes through render_error
        def render(self, content: object) -> bytes:
            return render_error(content)  # type: ignore[arg-type]

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(WireError)
    async def _wire(request: Request, exc: WireError) -> JSONResponse:
        return await _api(request, ProtocolError(f"{request.method} {request.url.path}: {exc}"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = _HTTP_KINDS.get(exc.status_code, ProtocolError)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route whose path matched only.
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return JSONResponse(
            error_body(kind.type, f"{request.method} {request.url.path}: {exc.detail}"),
            status_code=exc.status_code,
            headers=headers or None,
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return await _api(request, ValidationError(
            f"{request.method} {request.url.path}: invalid request ({problems}). "
            "Fix the request to match the schema at /docs."
        ))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # Nobody is left to read an answer; this is the client's doing, not a server fault.
        log.info("%s %s: the client disconnected before its request body was read whole",
                 request.method, request.url.path)
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(
                ServerError.type,
                f"{request.method} {request.url.path}: internal server error "
                f"({type(exc).__name__}: {exc}). Nothing was applied; the server keeps "
                "serving. Please report this.",
                "".join(tb.format_exception(exc)),
            ),
            status_code=500,
        )
