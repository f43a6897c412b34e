"""``POST /v1/states/push`` and ``/v1/states/pull``: move state values without a call."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from statehost.server.calls import Call
from statehost.server.deps import FrameBody, PrincipalDep, RuntimeDep, require_submit, require_token
from statehost.server.errors import (
    PayloadError,
    PayloadTooLargeError,
    ProtocolError,
    SessionNotFoundError,
    StateConflictError,
    StateNotFoundError,
    StorageError,
    ValidationError,
)
from statehost.server.openapi import frames
from statehost.server.routes._frames import frame_response, stream_nbytes
from statehost.server.transfer import pull_states, push_states
from statehost.wire import PullReply, PullRequest, PushReply, PushRequest

router = APIRouter(
    prefix="/v1/states",
    tags=["states"],
    dependencies=[Depends(require_token), Depends(require_submit)],
)


@router.post("/push", response_class=Response,
             summary="Upload state values into the session (a frame, scope submit)",
             **frames(
    PushRequest, PushReply, SessionNotFoundError, StateNotFoundError, ProtocolError, PayloadError,
    StateConflictError, ValidationError, PayloadTooLargeError, StorageError))
async def push(frame: FrameBody, rt: RuntimeDep, principal: PrincipalDep) -> Response:
    message = PushRequest.from_frame(frame)
    session = rt.session(message.session, principal, "POST /v1/states/push")
    rt.metrics.wire_bytes.labels("in", "state").inc(frame.section_nbytes("states"))
    reply = await rt.submit(
        Call("push", session, tuple(message.uploads), lambda c: push_states(c, message, rt)),
        "POST /v1/states/push")
    rt.refresh_gauges()
    return frame_response(reply)


@router.post("/pull", response_class=Response,
             **frames(PullRequest, PullReply, SessionNotFoundError, StateNotFoundError))
async def pull(frame: FrameBody, rt: RuntimeDep, principal: PrincipalDep) -> Response:
    message = PullRequest.from_frame(frame)
    session = rt.session(message.session, principal, "POST /v1/states/pull")
    reply = await rt.submit(
        Call("pull", session, message.ids, lambda c: pull_states(c, message, rt)),
        "POST /v1/states/pull")
    rt.metrics.wire_bytes.labels("out", "state").inc(stream_nbytes(reply.states))
    return frame_response(reply)
