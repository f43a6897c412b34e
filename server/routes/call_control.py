"""``POST /v1/calls/{call_id}/cancel``: cancel a queued call, or ask a running one to stop.

A call is visible only to the principal (token) whose session sent it: any other
token, like an unknown or finished id, gets 404. A running device program cannot be
interrupted (openxla/xla#16801): a running call goes on with ``cancel_requested`` set,
and work that runs in steps (a server-side loop) stops before its next step.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from statehost.server.calls import CallStatus
from statehost.server.deps import PrincipalDep, RuntimeDep, require_submit, require_token
from statehost.server.errors import CallNotFoundError
from statehost.server.openapi import errors

__all__ = ["CancelReply", "router"]

router = APIRouter(prefix="/v1/calls", tags=["calls"],
                   dependencies=[Depends(require_token), Depends(require_submit)])

_MSG_NO_CALL = (
    "POST /v1/calls/{shown}/cancel: no queued or running call {shown} of this token's "
    "sessions (it finished already, it was never sent, or another token sent it). A call is "
    "only found while it is queued or running, by the token whose session sent it. Fix: use "
    "the call id the client sent (statehost's client sends one with every call)."
)


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
