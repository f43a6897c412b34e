"""``POST /v1/sessions`` and ``DELETE /v1/sessions/{id}``: a client's lifetime on the server.

A session belongs to the principal (token) that opened it; any other token sees
it as absent (404), whatever its scope.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field, field_validator

from statehost.server.deps import PrincipalDep, RuntimeDep, require_token
from statehost.server.errors import QuotaExceededError, SessionNotFoundError
from statehost.server.openapi import errors

__all__ = ["ClientInfo", "SessionBody", "router"]

router = APIRouter(prefix="/v1/sessions", tags=["sessions"], dependencies=[Depends(require_token)])


class ClientInfo(BaseModel):
    """Which client opens the session; shown as the writer of what it commits."""

    host: str = Field(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]+$",
                      description="the client machine's host name")
    pid: int = Field(ge=0, le=2**32, description="the client's process id")

    @field_validator("pid", mode="before")
    @classmethod
    def _not_a_bool(cls, value: object) -> object:
        # JSON booleans are not integers (pydantic's lax mode takes false as 0); 3.0 is.
        if isinstance(value, bool):
            raise ValueError("a process id is an integer, not true/false")
        return value


class SessionBody(BaseModel):
    client: ClientInfo | None = None


@router.post("", status_code=201, summary="Open a session (statehost's client sends its "
             "host and process, recorded as the writer of its commits)",
             responses=errors(QuotaExceededError))
def open_session(rt: RuntimeDep, principal: PrincipalDep,
                 body: SessionBody | None = None) -> dict[str, object]:
    client = body.client if body is not None else None
    session = rt.open_session(principal, f"{client.host}, pid {client.pid}" if client else "")
    rt.refresh_gauges()
    return {"id": session.id, "ttl": rt.settings.session_ttl}


@router.delete("/{session_id}", status_code=204, responses=errors(SessionNotFoundError),
               summary="Close a session: its anonymous states are freed")
def close_session(session_id: str, rt: RuntimeDep, principal: PrincipalDep) -> Response:
    session = rt.session(session_id, principal, "DELETE /v1/sessions/{id}")
    rt.sessions.pop(session.id)
    rt.free(session)
    return Response(status_code=204)
