"""``POST /v1/call``: run a shipped transform on the resident states."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request, Response

from statehost.server.deps import FrameBody, require_submit, require_token
from statehost.server.engine import run_call
from statehost.server.errors import ApiError
from statehost.server.routes._frames import frame_response

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


def _lock_keys(header: dict) -> set[str]:
    keys = {k for k in header.get("refs", []) if isinstance(k, str)}
    keys |= {k for k in header.get("uploads", []) if isinstance(k, str)}
    if isinstance(header.get("default_stream"), str):
        keys.add(header["default_stream"])
    return keys


@router.post("/call", response_class=Response)
async def call(request: Request, frame: FrameBody) -> Response:
    rt = request.app.state.runtime  # not a dependency: see deps.py on the per-call path
    start = time.perf_counter()
    m = rt.metrics
    for part, section in (("function", "function"), ("args", "args"), ("state", "states")):
        m.wire_bytes.labels("in", part).inc(frame.section_nbytes(section))
    session = rt.session(frame.header.get("session"), "POST /v1/call")
    keys = _lock_keys(frame.header)
    try:
        result = await rt.scheduler.run(keys, run_call, frame, session, rt, keys)
    except ApiError as exc:
        m.calls.labels(_OUTCOMES.get(exc.type, "bad_request")).inc()
        raise
    except Exception:
        m.calls.labels("server_error").inc()
        raise
    finally:
        m.call_seconds.observe(time.perf_counter() - start)
    m.calls.labels("ok").inc()
    m.compiles.inc(result.compiled)
    m.function_cache.labels("hit" if result.cached else "miss").inc()
    m.wire_bytes.labels("out", "results").inc(result.bytes_out.get("results", 0))
    m.wire_bytes.labels("out", "state").inc(result.bytes_out.get("states", 0))
    return frame_response(result.frame)
