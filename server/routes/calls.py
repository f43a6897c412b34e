"""``POST /v1/call``: run a shipped transform on the resident states."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request, Response

from statehost.server.calls import Call
from statehost.server.deps import FrameBody, require_submit, require_token
from statehost.server.errors import (
    ApiError,
    FunctionNotCachedError,
    PayloadError,
    PayloadTooLargeError,
    ProtocolError,
    QuotaExceededError,
    RemoteExecutionError,
    SessionNotFoundError,
    StateConflictError,
    StateNotFoundError,
    StorageError,
    ValidationError,
)
from statehost.server.execution import run_call
from statehost.server.openapi import frames
from statehost.server.routes._frames import frame_response, stream_nbytes
from statehost.wire import CallReply, CallRequest

router = APIRouter(
    prefix="/v1",
    tags=["calls"],
    dependencies=[Depends(require_token), Depends(require_submit)],
)

_OUTCOMES = {
    "RemoteExecutionError": "user_error",
    "StateNotFoundError": "state_not_found",
    "FunctionNotCachedError": "function_not_cached",
    "StateConflictError": "conflict",
}


@router.post("/call", response_class=Response,
             summary="Run a shipped transform on resident states (a frame, scope submit)",
             **frames(
    CallRequest, CallReply, SessionNotFoundError, StateNotFoundError, ProtocolError, PayloadError,
    FunctionNotCachedError, StateConflictError, RemoteExecutionError, ValidationError,
    PayloadTooLargeError, StorageError, QuotaExceededError))
async def call(request: Request, frame: FrameBody) -> Response:
    rt = request.app.state.runtime  # not a dependency: see deps.py on the per-call path
    start = time.perf_counter()
    m = rt.metrics
    message = CallRequest.from_frame(frame)
    for part, section in (("function", "function"), ("args", "args"), ("state", "states")):
        m.wire_bytes.labels("in", part).inc(frame.section_nbytes(section))
    session = rt.session(message.session, request.state.principal, "POST /v1/call")
    keys = (*message.refs, *message.uploads, *filter(None, [message.default_stream]))
    work = Call("call", session, keys, lambda c: run_call(c, message, rt),
                timeout=message.timeout, **({"id": message.call_id} if message.call_id else {}))
    try:
        result = await rt.submit(work, "POST /v1/call")
    except ApiError as exc:
        m.calls.labels(_OUTCOMES.get(exc.type, "bad_request")).inc()
        raise
    except Exception:
        m.calls.labels("server_error").inc()
        raise
    finally:
        m.call_seconds.observe(time.perf_counter() - start)
    m.calls.labels("ok").inc()
    m.function_cache.labels("hit" if result.cached else "miss").inc()
    encoded = result.reply.to_frame()
    m.wire_bytes.labels("out", "results").inc(stream_nbytes(result.reply.results))
    if result.reply.states is not None:
        m.wire_bytes.labels("out", "state").inc(stream_nbytes(result.reply.states))
    return frame_response(encoded)
