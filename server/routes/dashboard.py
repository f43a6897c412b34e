"""``/dashboard``: the operator's live page; ``/v1/dashboard`` (+ ``/events``): its data.

The page is plain HTML, CSS and a little JavaScript shipped in the wheel
(``server/dashboard_static/``): no build step, no CDN, it works offline. It reads
``GET /v1/dashboard/events``, one Server-Sent Events stream of snapshots
(``server/dashboard.py``), so an open page costs one request, and one snapshot every
``interval`` seconds (a few KB: the page's refresh stays well under 20 KB/s).

Auth, as Jupyter does it: open ``/dashboard?token=...`` once; the server answers with an
HttpOnly, SameSite=Strict cookie holding a random login key and sends the browser on to
``/dashboard``, so the token leaves the address bar. Without a valid token or cookie the
page is a login form, never data. The JSON routes take the cookie or the usual bearer
token (scripts), and show what the token's namespaces allow.
"""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from statehost.server.auth import Principal, resolve
from statehost.server.dashboard import RECENT, snapshot
from statehost.server.deps import authenticate
from statehost.server.errors import AuthError, ForbiddenError, NotFoundError
from statehost.server.openapi import errors

__all__ = ["COOKIE", "pages", "router"]

COOKIE = "statehost_dashboard"
_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
_MSG_NO_LOGIN = (
    "{where}: no token and no dashboard login. Send 'Authorization: Bearer <token>', or "
    "open /dashboard?token=<token> once in the browser."
)

# The JSON routes take the bearer token as every route does (or the login cookie, which
# OpenAPI cannot name as an alternative for browsers only).
_SECURITY: dict[str, Any] = {"security": [{"bearerAuth": []}]}

pages = APIRouter(tags=["dashboard"], include_in_schema=False)
router = APIRouter(prefix="/v1/dashboard", tags=["dashboard"])


def _file(name: str) -> str:
    return (resources.files("statehost.server") / "dashboard_static" / name).read_text()


def _login_page(message: str, status: int) -> HTMLResponse:
    return HTMLResponse(_file("login.html").replace("{{message}}", message),
                        status_code=status, headers={"Cache-Control": "no-store"})


@pages.get("/dashboard")
async def dashboard(request: Request, token: str | None = None) -> Response:
    """The page with a valid login cookie; a login form otherwise; ``?token=`` logs in."""
    state = request.app.state
    if token is not None:
        principal = resolve(token.strip(), state.settings.tokens, state.runtime.tokens)
        if principal is None:
            return _login_page("That token is not accepted by this server.", 401)
        response = RedirectResponse("/dashboard", status_code=303)
        response.set_cookie(COOKIE, state.dashboard_logins.open(principal), httponly=True,
                            samesite="strict", path="/",
                            secure=request.url.scheme == "https")
        return response
    if state.dashboard_logins.principal(request.cookies.get(COOKIE)) is None:
        return _login_page("", 401)
    return HTMLResponse(_file("index.html"), headers={"Cache-Control": "no-store"})


@pages.get("/dashboard/static/{name}")
async def static(name: str) -> Response:
    """The page's script and style sheet (no data in them: no login needed)."""
    if name not in _STATIC:
        raise NotFoundError(f"GET /dashboard/static/{name}: no such file; there are "
                            f"{sorted(_STATIC)}.")
    return Response(_file(name), media_type=_STATIC[name],
                    headers={"Cache-Control": "no-cache"})


def _principal(request: Request, where: str) -> Principal:
    """The bearer token's principal, else the dashboard login's, else a 401."""
    state = request.app.state
    header = request.headers.get("authorization", "")
    if header:
        return authenticate(header, state.settings, state.runtime, where)
    principal = state.dashboard_logins.principal(request.cookies.get(COOKIE))
    if principal is None:
        raise AuthError(_MSG_NO_LOGIN.format(where=where))
    return principal


def _snapshot(request: Request, principal: Principal, recent: int) -> dict[str, Any]:
    state = request.app.state
    return snapshot(state.runtime, state.jobs, state.call_history, state.memory_history,
                    principal, recent)


@router.get("", summary="A snapshot of the box: devices, memory, namespaces, sessions, "
            "calls, recent calls, jobs (a bearer token or the dashboard's login cookie)",
            responses=errors(AuthError, ForbiddenError), openapi_extra=_SECURITY)
async def dashboard_snapshot(request: Request,
                             recent: int = Query(RECENT, ge=0, le=1000)) -> dict[str, Any]:
    principal = _principal(request, "GET /v1/dashboard")
    return await asyncio.to_thread(_snapshot, request, principal, recent)


@router.get("/events", summary="The snapshot every `interval` seconds, as Server-Sent "
            "Events (`event: snapshot`)", openapi_extra=_SECURITY, response_class=Response,
            responses={200: {"description": "`event: snapshot` with the JSON of "
                                            "GET /v1/dashboard, every `interval` seconds",
                             "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                       **errors(AuthError, ForbiddenError)})
async def dashboard_events(request: Request,
                           interval: float = Query(1.0, ge=0.25, le=60.0),
                           count: int | None = Query(None, ge=1)) -> StreamingResponse:
    """Stops after ``count`` snapshots when given (scripts, tests), else when the page
    closes."""
    principal = _principal(request, "GET /v1/dashboard/events")

    async def events() -> Any:
        sent = 0
        while count is None or sent < count:
            if await request.is_disconnected():
                return
            data = await asyncio.to_thread(_snapshot, request, principal, RECENT)
            yield f"event: snapshot\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
            sent += 1
            if count is None or sent < count:
                await asyncio.sleep(interval)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})
