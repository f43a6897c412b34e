"""``POST /v1/sessions`` and ``DELETE /v1/sessions/{id}``: a client's lifetime on the server.

A session belongs to the principal (token) that opened it; any other token sees
it as absent (404), whatever its scope.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, field_validator

from statehost.server.deps import PrincipalDep, RuntimeDep, require_token
from statehost.server.errors import QuotaExceededError, SessionNotFoundError
from statehost.server.openapi import errors

__all__ = ["ClientInfo", "ClosingBody", "SessionBody", "router"]

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


_MSG_CLOSES_LATER = (
    "session {id}... is closed to requests, but {jobs} job(s) of it still run: its states "
    "stay resident until the last one ends, then they are freed. Follow a job with "
    "client.job(id) (list them: GET /v1/jobs, statehost jobs)."
)


class ClosingBody(BaseModel):
    """The answer to closing a session whose jobs are going (202; 204 when freed now)."""

    id: str = Field(description="the session's first 8 characters")
    jobs: int = Field(description="its jobs still going: it is freed when they end")
    message: str


@router.delete("/{session_id}", status_code=204,
               responses={202: {"model": ClosingBody, "description": "closed; its states "
                                "are freed when its jobs end"}, **errors(SessionNotFoundError)},
               summary="Close a session: its anonymous states are freed (once its jobs end)")
def close_session(session_id: str, rt: RuntimeDep, principal: PrincipalDep) -> Response:
    where = "DELETE /v1/sessions/{id}"
    session = rt.session(session_id, principal, where)
    jobs = rt.close_session(session, f"closed by {where}")
    if not jobs:
        return Response(status_code=204)
    body = ClosingBody(id=session.id[:8], jobs=jobs,
                       message=_MSG_CLOSES_LATER.format(id=session.id[:8], jobs=jobs))
    return JSONResponse(body.model_dump(), status_code=202)
