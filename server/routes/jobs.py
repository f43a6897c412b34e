"""``/v1/jobs``: server-side loops that outlive their request, their progress and results.

``POST /v1/jobs`` takes a ``LoopRequest`` frame (scope ``submit``) and answers at once
with the job as JSON; the loop runs as one scheduler ``Call`` (``statehost.server.loops``).
``GET /v1/jobs`` lists the caller's jobs, ``GET /v1/jobs/{id}`` shows one,
``GET /v1/jobs/{id}/events`` streams its progress as Server-Sent Events (``progress``
at most ~10 a second, then one ``end``), ``GET /v1/jobs/{id}/result`` answers the
``CallReply`` frame once it completed, and ``POST /v1/jobs/{id}/cancel`` stops it
between steps. A job is visible to the principal that submitted it; to anyone else
it is a 404, like a job that never was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from statehost.server.calls import Call, CallCancelled
from statehost.server.deps import FrameBody, PrincipalDep, require_submit, require_token
from statehost.server.errors import (
    ApiError,
    JobCancelledError,
    JobNotDoneError,
    JobNotFoundError,
    PayloadError,
    ProtocolError,
    RemoteExecutionError,
    ServerError,
    SessionNotFoundError,
    StateConflictError,
    StateNotFoundError,
    StorageError,
    ValidationError,
    render_error,
)
from statehost.server.jobs import Job, JobTable
from statehost.server.loops import end_unstarted, run_loop
from statehost.server.openapi import errors, frames
from statehost.server.routes._frames import frame_response
from statehost.server.runtime import Runtime
from statehost.server.staging import _MSG_MISSING_STATES
from statehost.wire import KEEP, CallReply, LoopRequest

__all__ = ["router", "stop_jobs", "table"]

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_token)])

_SUBMIT = "POST /v1/jobs"
_JOB_ID = re.compile(r"[0-9a-f]{16,32}")  # fullmatch: no trailing newline either
_EVENTS_PER_SECOND = 10
_PING_EVERY = 10.0  # an SSE comment, so proxies and read timeouts see a live stream

_MSG_NOT_FOUND = (
    "{where}: no job {id} is visible to this token. A job is visible to the token that "
    "submitted it; the server keeps the last {kept} finished ones, and forgets all at a "
    "restart. Fix: list yours with GET /v1/jobs (statehost jobs)."
)
_MSG_NOT_DONE = (
    "{where}: job {id} is {status} ({done} of {total} step(s) done); its result is there "
    "once it completed. Fix: wait for the 'end' event of GET /v1/jobs/{id}/events (the "
    "client's job.result() does), or poll GET /v1/jobs/{id}."
)
# What GET .../result answers for a job that failed: that job's own error.
_RESULT_ERRORS = (JobNotFoundError, JobNotDoneError, JobCancelledError, RemoteExecutionError,
                  ValidationError, StateNotFoundError, StateConflictError, ProtocolError,
                  PayloadError, ServerError, StorageError)


def table(rt: Runtime) -> JobTable:
    """The app's job table, its gauge ``statehost_jobs{status}`` kept up to date."""
    gauge = rt.metrics.jobs

    def changed(jobs: JobTable) -> None:
        for status, count in jobs.counts().items():
            gauge.labels(status).set(count)

    jobs = JobTable(on_change=changed)
    changed(jobs)
    return jobs


async def stop_jobs(jobs: JobTable, grace: float) -> int:
    """At shutdown: asks every job to stop between steps, waits up to ``grace`` seconds
    for them; returns how many are still running."""
    going = jobs.going()
    for job in going:
        job.request_cancel("shutdown")
        if job.call is not None and job.call.status == "cancelled":
            end_unstarted(job)
    waits = [asyncio.ensure_future(job.watch().wait()) for job in going]
    if waits:
        _, pending = await asyncio.wait(waits, timeout=grace)
        for wait in pending:
            wait.cancel()
    return len(jobs.going())


def _jobs(request: Request) -> JobTable:
    return request.app.state.jobs


def _find(request: Request, job_id: str, principal: Any) -> Job:
    job = _jobs(request).get(job_id, principal)
    if job is None:
        shown = job_id if _JOB_ID.fullmatch(job_id) else repr(job_id[:40])
        raise JobNotFoundError(_MSG_NOT_FOUND.format(
            where=f"{request.method} {request.url.path}", id=shown,
            kept=_jobs(request).max_finished))
    return job


def _check(message: LoopRequest) -> None:
    """What the header alone can be wrong about: a 422 before anything runs."""
    problems = []
    if message.steps < 1:
        problems.append(f"steps={message.steps} must be >= 1")
    if message.keep not in KEEP:
        problems.append(f"keep={message.keep!r} must be one of {', '.join(map(repr, KEEP))}")
    if message.keep_outputs:  # the stream's fields, which a loop would silently ignore
        problems.append("keep_outputs=true is for calls of the stream: a loop's outputs "
                        "come back in its result")
    if message.returns != "values":
        problems.append(f"returns={message.returns!r:.40} must be 'values': a loop's result "
                        "holds its outputs")
    if message.call_id is not None and not _JOB_ID.fullmatch(message.call_id):
        problems.append(f"call_id={message.call_id!r:.60} must be 16 to 32 lowercase hex "
                        "digits (it becomes the job's id)")
    if problems:
        raise ValidationError(f"{_SUBMIT}: {'; '.join(problems)}. Fix: "
                              "client.loop(mapping, steps, ..., keep='last' | 'all').")


async def _drive(rt: Runtime, job: Job, call: Call) -> None:
    """Runs the loop's call; ends the job however the scheduler ends the call."""
    try:
        await rt.submit(call, _SUBMIT)
    except CallCancelled:
        end_unstarted(job)
    except ApiError as exc:
        if not job.is_done:  # refused before the loop began (a scheduler's own error)
            job.fail(exc.body(), exc.status)
    except asyncio.CancelledError:  # the server shuts down: a running loop runs on
        raise
    except BaseException:  # noqa: S110  run_loop recorded its failure; the rest is ours
        if not job.is_done:
            error = ServerError(f"job {job.id}: the server stopped running it.")
            job.fail(error.body(), error.status)


@router.post(
    "", status_code=202, dependencies=[Depends(require_submit)],
    summary="Submit a loop: a shipped transform run `steps` times on the server, each step "
            "committed (a LoopRequest frame, scope submit); answers the job at once",
    responses=errors(SessionNotFoundError, StateNotFoundError, ProtocolError,
                     ValidationError),
    openapi_extra=frames(LoopRequest, CallReply)["openapi_extra"])
async def submit(request: Request, frame: FrameBody, principal: PrincipalDep
                 ) -> dict[str, Any]:
    rt: Runtime = request.app.state.runtime
    jobs = _jobs(request)
    message = LoopRequest.from_frame(frame)
    _check(message)
    session = rt.session(message.session, principal, _SUBMIT)
    if message.call_id is not None:
        again = jobs.get(message.call_id, principal)
        if again is not None:  # a re-sent submission: the same job, never a second run
            return again.describe()
    # Refs the frame does not upload must be visible now: a 404 here (not a failed job)
    # lets the client upload them and re-send, as it does for a call.
    missing = [i for i in message.refs
               if i not in message.uploads and rt.store.get(i, session) is None]
    if missing:
        raise StateNotFoundError(_MSG_MISSING_STATES.format(where=_SUBMIT,
                                                            ids=", ".join(missing)),
                                 missing=missing)
    job = Job(session, message.steps, message.keep, message.timeout,
              **({"id": message.call_id} if message.call_id else {}))
    # The job keeps its session's states until it ends, even if the session is closed.
    if not rt.sessions.hold(session, job.id):  # closed since it was looked up
        rt.session(session.id, principal, _SUBMIT)  # raises its 404
    job.on_end = lambda ended: rt.end_job(ended.session, ended.id)
    keys = (*message.refs, *message.uploads, *filter(None, [message.default_stream]))
    # A job's own timeout bounds it (the loop stops between steps past it); without one
    # it may wait and run as long as it takes, not the server's per-call default.
    job.call = Call("loop", session, keys, lambda call: run_loop(call, message, job, rt),
                    id=job.id, timeout=message.timeout or math.inf)
    rt.quotas.check_queued(job.call, _SUBMIT)  # a 429 now; _drive checks again as it queues
    jobs.add(job)
    jobs.tasks.add(task := asyncio.ensure_future(_drive(rt, job, job.call)))
    task.add_done_callback(jobs.tasks.discard)
    return job.describe()


@router.get("", summary="The caller's jobs (every session of this token), oldest first")
async def list_jobs(request: Request, principal: PrincipalDep) -> dict[str, Any]:
    return {"jobs": [job.describe() for job in _jobs(request).of(principal)]}


@router.get("/{job_id}", responses=errors(JobNotFoundError),
            summary="A job's status, progress (steps done of total, steps/s, ETA) and error")
async def get_job(job_id: str, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    return _find(request, job_id, principal).describe()


@router.post("/{job_id}/cancel", responses=errors(JobNotFoundError),
             summary="Cancel a job: at once if queued, else between two steps (a running "
                     "device program cannot be interrupted); answers the job")
async def cancel_job(job_id: str, request: Request, principal: PrincipalDep) -> dict[str, Any]:
    job = _find(request, job_id, principal)
    job.request_cancel()
    if job.call is not None and job.call.status == "cancelled":
        end_unstarted(job)  # it never started and never will: cancelled now
    return job.describe()


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _events(job: Job) -> AsyncIterator[bytes]:
    ended = job.watch()
    last: tuple[Any, ...] | None = None
    sent = time.monotonic()
    while True:
        state, now = (job.status, job.done, job.cancel_requested), time.monotonic()
        if state != last:
            last, sent = state, now
            yield _event("progress", {"id": job.id, "status": str(job.status),
                                      "cancel_requested": job.cancel_requested,
                                      **job.progress()})
        elif now - sent > _PING_EVERY:
            sent = now
            yield b": ping\n\n"
        if job.is_done:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), 1 / _EVENTS_PER_SECOND)
    yield _event("end", job.describe())


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"description": "Server-Sent Events: 'progress' (JSON: status, "
                                            "done, total, steps_per_second, eta_s), at most "
                                            f"~{_EVENTS_PER_SECOND} a second, then one 'end' "
                                            "(JSON: the job as GET /v1/jobs/{id} shows it)",
                             "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                       **errors(JobNotFoundError)},
            summary="A job's progress as Server-Sent Events, until it ends")
async def job_events(job_id: str, request: Request, principal: PrincipalDep
                     ) -> StreamingResponse:
    job = _find(request, job_id, principal)
    return StreamingResponse(_events(job), media_type="text/event-stream",
                             headers={"cache-control": "no-cache",
                                      "x-accel-buffering": "no"})


@router.get("/{job_id}/result", response_class=Response,
            responses={200: frames(LoopRequest, CallReply)["responses"][200],
                       **errors(*_RESULT_ERRORS)},
            summary="A completed job's result: a CallReply frame (outputs, written states, "
                    "their versions); a failed job answers its error, a cancelled one 409")
async def job_result(job_id: str, request: Request, principal: PrincipalDep) -> Response:
    job = _find(request, job_id, principal)
    if job.reply is not None:
        return frame_response(job.reply)
    if job.error is not None:
        return Response(render_error(job.error), status_code=job.error_status or 500,
                        media_type="application/json")
    raise JobNotDoneError(
        _MSG_NOT_DONE.format(where=f"GET /v1/jobs/{job.id}/result", id=job.id,
                             status=job.status, done=job.done, total=job.steps),
        job_status=str(job.status), done=job.done, total=job.steps)
