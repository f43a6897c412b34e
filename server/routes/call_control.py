"""A caller's calls: ``GET /v1/calls`` and ``GET /v1/calls/{call_id}`` (how long each waited
in the scheduler's queue and ran), ``POST /v1/calls/{call_id}/cancel`` (cancel a queued
call, or ask a running one to stop).

A call is visible only to the principal (token) whose session sent it: any other
token, like an unknown id, gets 404. A finished call is shown while the server's call
history (its last 1,000 calls, every tenant's) still holds it, and cannot be cancelled.
A running device program cannot be interrupted (openxla/xla#16801): a running call goes
on with ``cancel_requested`` set, and work that runs in steps (a server-side loop) stops
before its next step.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from statehost.server.calls import CallStatus
from statehost.server.deps import PrincipalDep, RuntimeDep, require_submit, require_token
from statehost.server.errors import CallNotFoundError
from statehost.server.history import summary
from statehost.server.openapi import errors

__all__ = ["CallRecord", "CancelReply", "router"]

router = APIRouter(prefix="/v1/calls", tags=["calls"],
                   dependencies=[Depends(require_token), Depends(require_submit)])

_MSG_NO_CALL = (
    "POST /v1/calls/{shown}/cancel: no queued or running call {shown} of this token's "
    "sessions (it finished already, it was never sent, or another token sent it). A call is "
    "only found while it is queued or running, by the token whose session sent it. Fix: use "
    "the call id the client sent (statehost's client sends one with every call)."
)

_MSG_NO_RECORD = (
    "GET /v1/calls/{shown}: no call {shown} of this token's sessions is queued, running or in "
    "the server's call history (it was never sent, another token sent it, or it finished "
    "long enough ago that the history, which keeps the server's last 1,000 calls, forgot "
    "it). Fix: use the call id the client sent (a RemoteArray's handle starts with it), and "
    "ask soon after the call; GET /v1/calls lists this token's recent calls."
)


class CallRecord(BaseModel):
    """One call, as the scheduler saw it: how long it waited and ran (seconds)."""

    id: str = Field(description="the call's id (the client's, for calls it sent)")
    kind: str = Field(description="call, fetch, pull, push, put, get, invoke, ...")
    outcome: CallStatus = Field(description="its status: queued or running now, or how it "
                                "ended (committed, failed, cancelled)")
    namespace: str | None = Field(description="the namespace of its token (null: operator)")
    session: str | None = Field(description="the first 8 characters of its session's id")
    queued_s: float = Field(description="seconds from its creation on the server to its "
                            "start on a worker (so far, while it is queued): its wait in "
                            "the scheduler's queue")
    running_s: float | None = Field(description="seconds it ran on a worker (so far, while "
                                    "it runs); null if it never started")
    error: str | None = Field(description="the error type it failed or was dropped with")
    finished: float | None = Field(description="when it ended (Unix time); null while it is "
                                   "queued or running")
    compiled: int | None = Field(None, description="programs it compiled (shipped calls)")
    bytes_in: int | None = Field(None, description="argument and upload bytes it received")
    bytes_out: int | None = Field(None, description="result and state bytes it sent back")


def _records(rt: RuntimeDep, principal: PrincipalDep, count: int,
             call_id: str | None = None) -> list[CallRecord]:
    """This principal's calls: those queued or running (newest first), then the finished
    ones, the latest to finish first."""
    live = [c for c in rt.scheduler.calls if c.session is not None
            and c.principal == principal and (call_id is None or c.id == call_id)]
    live.sort(key=lambda c: c.created, reverse=True)
    found = [summary(c) for c in live[:count]]
    history = rt.scheduler.calls.history
    if history is not None and len(found) < count:
        found += history.of(principal, count - len(found), call_id)
    return [CallRecord(**entry) for entry in found]


@router.get("", summary="This token's calls: queued and running ones, then the latest to "
                        "finish, with their waits in the queue (scope submit)")
async def list_calls(rt: RuntimeDep, principal: PrincipalDep,
                     last: Annotated[int, Query(ge=1, le=1000, description=(
                         "how many calls, at most"))] = 20) -> list[CallRecord]:
    return _records(rt, principal, last)


@router.get("/{call_id}", responses=errors(CallNotFoundError),
            summary="One of this token's calls: its status, its wait in the queue and its "
                    "run (scope submit)")
async def get_call(call_id: str, rt: RuntimeDep, principal: PrincipalDep) -> CallRecord:
    found = _records(rt, principal, 1, call_id)
    if not found:
        shown = call_id if len(call_id) <= 64 else f"{call_id[:64]}..."
        raise CallNotFoundError(_MSG_NO_RECORD.format(shown=shown))
    return found[0]


class CancelReply(BaseModel):
    """What cancelling did."""

    id: str = Field(description="the call's id")
    status: CallStatus = Field(description="'cancelled': it will never start, nothing was "
                               "applied; 'running': it runs on (a device program cannot be "
                               "interrupted) and stops at its next step; 'committed' or "
                               "'failed': it had just finished")
    cancel_requested: bool = Field(description="whether the call was asked to stop")


@router.post("/{call_id}/cancel", responses=errors(CallNotFoundError),
             summary="Cancel a queued call, or ask a running one to stop at its next step "
                     "(scope submit)")
async def cancel_call(call_id: str, rt: RuntimeDep, principal: PrincipalDep) -> CancelReply:
    call = rt.scheduler.calls.find(call_id, principal)
    if call is None:
        shown = call_id if len(call_id) <= 64 else f"{call_id[:64]}..."
        raise CallNotFoundError(_MSG_NO_CALL.format(shown=shown))
    status = call.request_cancel()
    return CancelReply(id=call.id, status=status, cancel_requested=call.cancel_requested)
