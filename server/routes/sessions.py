"""``POST /v1/sessions`` and ``DELETE /v1/sessions/{id}``: a client's lifetime on the server.

A session belongs to the principal (token) that opened it; any other token sees
it as absent (404), whatever its scope.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from statehost.server.deps import PrincipalDep, RuntimeDep, require_token
from statehost.server.errors import SessionNotFoundError
from statehost.server.openapi import errors

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Depends(require_token)])


@router.post("", status_code=201)
def open_session(rt: RuntimeDep, principal: PrincipalDep) -> dict[str, object]:
    session = rt.sessions.create(principal)
    rt.refresh_gauges()
    return {"id": session.id, "ttl": rt.settings.session_ttl}


@router.delete("/{session_id}", status_code=204, responses=errors(SessionNotFoundError))
def close_session(session_id: str, rt: RuntimeDep, principal: PrincipalDep) -> Response:
    session = rt.session(session_id, principal, "DELETE /v1/sessions/{id}")
    rt.sessions.pop(session.id)
    rt.free(session)
    return Response(status_code=204)
