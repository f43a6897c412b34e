"""Dependencies: settings, the runtime, bearer-token auth and reading a frame body.

Every provider is ``async def`` although none awaits: FastAPI runs a plain
``def`` dependency in its thread pool, and three thread hops per request
cost about 0.4 ms on a small machine (measured with bench/bench_remote.py).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from statehost._errors import WireError
from statehost.server import shared_memory
from statehost.server.auth import Principal, resolve
from statehost.server.errors import (
    AuthError,
    ForbiddenError,
    PayloadTooLargeError,
    ProtocolError,
    UnsupportedMediaTypeError,
    VersionMismatchError,
)
from statehost.server.runtime import Runtime
from statehost.server.settings import Settings
from statehost.server.store import Session
from statehost.wire import CONTENT_TYPE, Frame, decode, fresh_buffer, version_problems

__all__ = ["FrameBody", "PrincipalDep", "RequestSessionDep", "RuntimeDep", "SettingsDep",
           "VersionsDep", "get_runtime", "get_settings", "get_versions", "read_frame",
           "request_session", "require_submit", "require_token"]


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


SettingsDep = Annotated[Settings, Depends(get_settings)]
RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_versions(request: Request) -> dict[str, object]:
    """The versions this server reports and checks (``app.state.versions``)."""
    return request.app.state.versions


VersionsDep = Annotated[dict, Depends(get_versions)]


# The dependencies on the per-call path (require_token, require_submit, read_frame) read
# the app's state directly instead of depending on get_settings & co: FastAPI solves each
# sub-dependency per request, and flattening them took ~0.2 ms off every /v1/call
# (bench/bench_remote.py, tiny case).


async def require_token(request: Request) -> Principal:
    """Every route but ``/v1/health``: ``Authorization: Bearer <token>``; sets the principal."""
    settings, rt = request.app.state.settings, request.app.state.runtime
    principal = authenticate(request.headers.get("authorization", ""), settings, rt,
                             f"{request.method} {request.url.path}")
    request.state.principal = principal
    return principal


def authenticate(header: str, settings: Settings, rt: Runtime, where: str) -> Principal:
    """The principal of an ``Authorization`` header's bearer token (HTTP and the stream)."""
    scheme, _, token = header.partition(" ")
    if not header:
        raise AuthError(
            f"{where}: no token. Send 'Authorization: Bearer <token>' (statehost.connect(url, "
            "token=...) does it; on the server's own machine it reads "
            "$XDG_CONFIG_HOME/statehost/token).",
        )
    token = token.strip()
    principal = resolve(token, settings.tokens, rt.tokens) if scheme.lower() == "bearer" \
        else None
    if principal is None:
        raise AuthError(
            f"{where}: the token is not accepted by this server. Fix: use the token the server "
            "printed at start, one from STATEHOST_TOKENS, or one made with "
            "`statehost token create`.",
        )
    return principal


PrincipalDep = Annotated[Principal, Depends(require_token)]


async def request_session(request: Request, principal: PrincipalDep) -> Session:
    """The session of one JSON request that commits: its writer is the token's label and
    the caller's address (a JSON caller sends no host or process of its own)."""
    peer = request.client.host if request.client is not None else "an unknown address"
    return Session.for_request(principal, f"JSON API from {peer}")


RequestSessionDep = Annotated[Session, Depends(request_session)]


async def require_submit(request: Request) -> None:
    """Routes that take pickles (code): the token needs scope ``submit``.

    Listed after ``require_token`` in a router's dependencies, which set the principal.
    """
    principal: Principal = request.state.principal
    if not principal.has("submit"):
        raise ForbiddenError(
            f"{request.method} {request.url.path}: this token has scope {principal.scope!r}; "
            "sending code needs 'submit'. Fix: use a token made with --scope submit, or the "
            "JSON API (/docs) for read and invoke.",
        )


async def read_frame(request: Request) -> Frame:
    """Reads and decodes a frame body, refusing oversized bodies before reading them whole."""
    settings, versions = request.app.state.settings, request.app.state.versions
    where = f"{request.method} {request.url.path}"
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip() != CONTENT_TYPE:
        raise UnsupportedMediaTypeError(
            f"{where}: expected Content-Type {CONTENT_TYPE}, got {ctype or 'none'!r}.",
        )
    limit = settings.max_body
    declared = request.headers.get("content-length")
    too_big = PayloadTooLargeError(
        f"{where}: the body is larger than this server's limit of {limit} bytes "
        f"(max_body). Fix: send less per call, or start the server with a larger --max-body.",
        limit=limit,
    )
    if declared is not None:
        if not declared.isdigit():
            raise ProtocolError(f"{where}: bad Content-Length {declared!r}.")
        if int(declared) > limit:
            raise too_big
        body: Any = fresh_buffer(int(declared))
    else:
        body = bytearray()
    pos = 0
    async for chunk in request.stream():
        end = pos + len(chunk)
        if end > limit:
            raise too_big
        if declared is None:
            body += chunk
        elif end > len(body):
            raise ProtocolError(f"{where}: the body is longer than its Content-Length "
                                f"{declared}.")
        else:
            body[pos:end] = chunk
        pos = end
    if pos != len(body):
        raise ProtocolError(
            f"{where}: the body ended after {pos} of {len(body)} bytes (truncated upload).",
        )
    request.state.body_bytes = pos
    attach = shared_memory.attacher(request, where)
    if attach is None:  # the buffers are views of the body: decoding copies nothing
        return checked_frame(body, versions, where)
    # On CPU devices the buffers are copied out of the client's arena (30 ms per 128 MiB):
    # off the event loop, which /v1/health and every other request share.
    return await run_in_threadpool(checked_frame, body, versions, where, attach)


def checked_frame(body: Any, versions: dict[str, object], where: str,
                  attach: Any = None) -> Frame:
    """Decodes a frame and refuses one whose sender's versions cannot exchange pickles
    (``attach``: its buffers in shared memory, ``server/shared_memory.py``)."""
    try:
        frame = decode(body, attach)
    except WireError as exc:
        raise ProtocolError(f"{where}: {exc}") from exc
    theirs = frame.header.get("versions")
    problems = _compatible(versions, theirs)
    if problems:
        raise VersionMismatchError(
            f"{where}: the client and the server cannot exchange pickles: "
            + "; ".join(problems)
            + ". Fix: install matching versions on both sides.",
            server=versions, client=theirs,
        )
    return frame


# Versions dicts already judged compatible (every frame of a client repeats its own),
# keyed by their items: parsing the versions again for each frame cost ~15 us.
_COMPATIBLE: set[tuple[int, tuple[Any, ...]]] = set()


def _compatible(versions: dict[str, object], theirs: object) -> list[str]:
    """``version_problems`` of a frame's ``versions`` field, remembered when there are none."""
    try:
        key = (id(versions), tuple(sorted(theirs.items())))  # type: ignore[union-attr]
        if key in _COMPATIBLE:
            return []
    except (AttributeError, TypeError):  # not a dict, or unhashable values: judge it anew
        key = None
    problems = version_problems(versions, theirs if isinstance(theirs, dict) else {},
                                me="server", them="client")
    if not problems and key is not None and len(_COMPATIBLE) < 1024:
        _COMPATIBLE.add(key)
    return problems


FrameBody = Annotated[Frame, Depends(read_frame)]
