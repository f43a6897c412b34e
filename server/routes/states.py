"""``POST /v1/states/push`` and ``/v1/states/pull``: move state values without a call."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from statehost.server.deps import FrameBody, RuntimeDep, require_submit, require_token
from statehost.server.engine import pull_states, push_states
from statehost.server.routes._frames import frame_response

router = APIRouter(
    prefix="/v1/states",
    tags=["states"],
    dependencies=[Depends(require_token), Depends(require_submit)],
)


@router.post("/push", response_class=Response)
async def push(frame: FrameBody, rt: RuntimeDep) -> Response:
    session = rt.session(frame.header.get("session"), "POST /v1/states/push")
    rt.metrics.wire_bytes.labels("in", "state").inc(frame.section_nbytes("states"))
    keys = [k for k in frame.header.get("uploads", []) if isinstance(k, str)]
    reply = await rt.scheduler.run(keys, push_states, frame, session, rt)
    rt.refresh_gauges()
    return frame_response(reply)


@router.post("/pull", response_class=Response)
async def pull(frame: FrameBody, rt: RuntimeDep) -> Response:
    session = rt.session(frame.header.get("session"), "POST /v1/states/pull")
    ids = frame.header.get("ids", [])
    keys = [k for k in ids if isinstance(k, str)] if isinstance(ids, list) else []
    reply = await rt.scheduler.run(keys, pull_states, frame, session, rt)
    rt.metrics.wire_bytes.labels("out", "state").inc(reply.nbytes)
    return frame_response(reply)
