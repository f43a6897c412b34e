"""The loop runner: a shipped transform run ``steps`` times inside one scheduler ``Call``.

One ``Call`` of kind ``"loop"`` holds the locks of every state the loop touches, on
one worker, for the whole loop. Its work (:func:`run_loop`):

1. the first step's :class:`~statehost.server.staging.Transaction` stages the uploads,
   resolves the callable (the session's cache, or the function section) and unpickles
   ``(args, kwargs, over)`` once; ``over``'s leaves must all have ``steps`` rows;
2. each step runs the transform with ``over``'s row ``i`` after ``args`` (as
   ``jax.lax.scan`` passes ``xs``) in a Transaction of its own that commits, so a
   loop that fails, is cancelled or times out leaves the states of its last
   completed step and says which step that was;
3. between steps the runner checks the job's cancel flag, the call's, and the
   deadline; a step in flight (one device program) is never interrupted
   (openxla/xla#16801: no API cancels a launched executable);
4. at the end, one ``device_get`` copies the outputs (the last step's, or every
   step's, stacked) and the pulled states to the host, and the job keeps the
   ``CallReply``.

The per-step path does no unpickling, no lookups of the callable and no host copies;
the device runs at most ``_AHEAD`` steps behind the host (after dispatching step ``i``
the runner waits for step ``i - _AHEAD``), so the device is never idle for want of a
dispatch, and a cancel stops it within a few steps.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from statehost.random import RandomState
from statehost.server.admission import NotAdmitted
from statehost.server.callable_cache import unpickle
from statehost.server.errors import (
    ApiError,
    JobCancelledError,
    ProtocolError,
    ServerError,
    StateNotFoundError,
    ValidationError,
)

# The one call path's helpers, shared so a loop step runs exactly as a call does.
from statehost.server.execution import _admit, _is_weak, _resolve, _run, _user_error, to_host
from statehost.server.staging import _MSG_MISSING_STATES, Transaction
from statehost.wire import CallReply, LoopRequest, pack

if TYPE_CHECKING:
    from statehost.server.calls import Call
    from statehost.server.jobs import Job
    from statehost.server.runtime import Runtime

__all__ = ["check_over", "end_unstarted", "run_loop"]

_WHERE = "POST /v1/jobs"
# How many dispatched steps the device may still be working on. One costs a wait on the
# device per step (+25% per tiny pmap step, 2 busy cores); two hide it.
_AHEAD = 2
# A session idle this long is not expired by a loop that runs: each step touches it,
# at most this often (seconds).
_TOUCH_EVERY = 1.0

_MSG_OVER_AXES = (
    "{where}: over= must be a pytree of arrays whose leading axis has one row per step "
    "(steps={steps}); {problems}. Fix: pass arrays of shape (steps, ...), e.g. "
    "over=batches[:steps], or set steps=len(batches)."
)
_MSG_GONE = (
    "job {job}: states {ids} were freed while the loop ran: its session was closed "
    "(client.close(), DELETE /v1/sessions/{{id}}) or their named object deleted. Fix: keep "
    "the submitting client open until the job ends (a client killed without closing is "
    "fine: the job keeps its session open), or run loops on named states (client.put)."
)
_MSG_STOPPED = (
    "{where}: job {job} was {what} after {completed} of {steps} step(s); every state keeps "
    "the value its step {completed} committed{none}."
)


def check_over(over: Any, steps: int, where: str = _WHERE) -> tuple[list[Any], Any]:
    """``over``'s leaves and structure, or a 422 naming each leaf without ``steps`` rows."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(over)
    problems = []
    for path, leaf in leaves:
        shape = getattr(leaf, "shape", None)
        name = f"over{jax.tree_util.keystr(path)}"
        if shape is None:
            problems.append(f"{name} is a {type(leaf).__name__}, not an array")
        elif len(shape) == 0 or shape[0] != steps:
            problems.append(f"{name} has shape {tuple(shape)}")
    if problems:
        raise ValidationError(_MSG_OVER_AXES.format(where=where, steps=steps,
                                                    problems="; ".join(problems)))
    return [leaf for _, leaf in leaves], treedef


def _stream(request: LoopRequest, tx: Transaction) -> RandomState | None:
    if request.default_stream is None:
        return None
    stream = tx.lookup(request.default_stream)
    if not isinstance(stream, RandomState):
        raise StateNotFoundError(
            _MSG_MISSING_STATES.format(where=_WHERE, ids=request.default_stream),
            missing=[request.default_stream])
    return stream


def _load_args(request: LoopRequest, tx: Transaction) -> tuple[tuple, dict, Any]:
    loaded = unpickle(request.args, tx.load_ref, "args", _WHERE)
    if not (isinstance(loaded, tuple) and len(loaded) == 3 and isinstance(loaded[0], tuple)
            and isinstance(loaded[1], dict)):
        raise ProtocolError(f"{_WHERE}: the args section of a loop must hold (args tuple, "
                            f"kwargs dict, over); got {type(loaded).__name__}.")
    return loaded


class _Progress:
    """What the steps committed so far add up to (for the reply, or a stopped job's error)."""

    def __init__(self) -> None:
        self.completed = 0
        self.written: dict[str, None] = {}
        self.versions: dict[str, int] = {}
        self.uploaded_versions: dict[str, int] = {}
        self.compiled = 0

    def extra(self) -> dict[str, Any]:
        return {"completed": self.completed, "written": list(self.written),
                "state_versions": self.versions}


def run_loop(call: Call, request: LoopRequest, job: Job, rt: Runtime) -> None:
    """The work of a loop's ``Call``: runs the steps, and ends ``job`` however it ends."""
    progress = _Progress()
    try:
        _steps(call, request, job, rt, progress)
    except NotAdmitted:  # its first step does not fit now: back to the queue, job queued
        raise
    except ApiError as exc:
        _fail(job, exc, progress)
        raise
    except BaseException as exc:
        _fail(job, ServerError(
            f"{_WHERE}: job {job.id} failed in the server ({type(exc).__name__}: {exc}).",
            traceback=None), progress)
        raise
    finally:
        if call.session is not None:
            call.session.last_seen = time.monotonic()  # its TTL counts from the job's end


def _fail(job: Job, exc: ApiError, progress: _Progress) -> None:
    body = exc.body()
    error = body["error"]
    done = progress.completed
    where = (f"step {done + 1} of {job.steps}: no step committed, every state is unchanged"
             if not done else f"step {done + 1} of {job.steps}: the {done} step(s) before it "
             "committed, and every state keeps the value the last of them wrote")
    error["message"] = f"{error['message']} [job {job.id}, {where}]"
    error.update(job=job.id, step=done, **progress.extra())
    job.fail(body, exc.status)


def _stopped(job: Job, reason: str, progress: _Progress) -> None:
    what = {"timeout": f"stopped by its timeout of {job.timeout:g} s" if job.timeout is not None
            else "stopped by its timeout", "shutdown": "stopped by the server's shutdown"
            }.get(reason, "cancelled")
    done = progress.completed
    exc = JobCancelledError(
        _MSG_STOPPED.format(where=f"job {job.id}", job=job.id, what=what, completed=done,
                            steps=job.steps, none=" (none ran: nothing changed)" if not done
                            else ""),
        reason=reason, job=job.id, **progress.extra())
    job.stop(reason, exc.body(), exc.status)


def _one_array(out: Any, tx: Transaction) -> jax.Array | None:
    """An array the step computed: when it is ready, the step's program has run (one
    program computes the outputs and the new state values together)."""
    if isinstance(out, jax.Array):
        return out
    for value in tx.pending.values.values():
        if isinstance(value, jax.Array):
            return value
    leaves = jax.tree_util.tree_leaves((out, list(tx.pending.values.values())))
    return next((x for x in leaves if isinstance(x, jax.Array)), None)


def _wait(array: jax.Array, step: int, job: Job) -> None:
    """Waits for step ``step``'s program; an error it met on the device is the user's."""
    try:
        array.block_until_ready()
    except Exception as exc:
        # Device errors surface when a result is awaited, after the step was committed.
        raise _user_error(exc, f"{_WHERE}: job {job.id}: step {step + 1}'s program failed on "
                               f"the device after the step was committed (the states written "
                               f"from it on may be unusable)") from exc


def _freed(ids: frozenset[str], store: Any) -> list[str]:
    return [state_id for state_id in ids if store.meta(state_id) is None]


def _check_resident(job: Job, ids: frozenset[str], store: Any,
                    cause: BaseException | None = None) -> None:
    """A 404 naming the loop's states that were freed while it ran (checked per step)."""
    gone = _freed(ids, store)
    if gone:
        raise StateNotFoundError(_MSG_GONE.format(job=job.id, ids=", ".join(gone)),
                                 missing=gone) from cause


def end_unstarted(job: Job) -> None:
    """Ends a job whose call was cancelled before it started (nothing ran)."""
    _stopped(job, job.reason or "cancelled", _Progress())


def _steps(call: Call, request: LoopRequest, job: Job, rt: Runtime, progress: _Progress
           ) -> None:
    session = call.session
    assert session is not None
    steps = request.steps
    reason = job.should_stop()
    if reason is not None:
        _stopped(job, reason, progress)
        return
    tx = Transaction(rt, session, _WHERE)
    try:
        tx.stage(request.states, request.uploads)
        tx.require(request.refs)
        stream = _stream(request, tx)
        transform, _ = _resolve(request, tx, rt, session)
        args, kwargs, over = _load_args(request, tx)
        outside = tx.loaded - set(call.keys)
        if outside:
            raise ProtocolError(f"{_WHERE}: the payload uses states {sorted(outside)} that "
                                "header.refs does not list.")
        rows, rows_tree = (None, None) if over is None else check_over(over, steps)
        # Admitted by device memory like a call: the first step's program is estimated
        # (and compiled) here; its reservation holds until the loop's call ends.
        misses = transform.cache_info().misses
        first = args if rows is None else \
            (*args, jax.tree_util.tree_unflatten(rows_tree, [x[0] for x in rows]))
        try:
            _admit(call, rt, tx, transform, first, kwargs, stream, _WHERE)
        except NotAdmitted:  # what it compiled counts when it runs
            call.compiled_before += transform.cache_info().misses - misses
            raise
    except BaseException:
        tx.rollback()
        raise
    job.start()
    loaded = frozenset(tx.loaded)
    store = rt.store
    keep_all = request.keep == "all"
    kept: list[Any] = []
    out: Any = None
    behind: collections.deque[Any] = collections.deque()  # one array of each step in flight
    touched = time.monotonic()
    for i in range(steps):
        if i:
            reason = job.should_stop()
            if reason is not None:
                _stopped(job, reason, progress)
                return
            _check_resident(job, loaded, store)
            tx = Transaction(rt, session, _WHERE)
            tx.loaded |= loaded
        step_args = args if rows is None else \
            (*args, jax.tree_util.tree_unflatten(rows_tree, [x[i] for x in rows]))
        try:
            out = _run(tx, transform, step_args, kwargs, stream, _WHERE)
            behind.append(_one_array(out, tx))
            done = tx.commit()
        except BaseException as exc:
            tx.rollback()
            reason = job.should_stop()
            if reason is not None and _freed(loaded, store):
                # A client that pressed Ctrl-C and exited closed its session mid-step.
                _stopped(job, reason, progress)
                return
            _check_resident(job, loaded, store, exc)  # freed during the step: say so
            raise
        if i == 0:
            progress.uploaded_versions = done.uploaded_versions
        progress.written.update(dict.fromkeys(done.written))
        progress.versions.update(done.versions)
        progress.completed = job.done = i + 1
        if keep_all:
            kept.append(out)
        if len(behind) > _AHEAD:
            oldest = behind.popleft()
            if oldest is not None:
                _wait(oldest, i - _AHEAD, job)
        now = time.monotonic()
        if now - touched > _TOUCH_EVERY:
            session.last_seen = touched = now  # a running job keeps its session open
    progress.compiled = transform.cache_info().misses - misses + call.compiled_before
    job.complete(_reply(job, request, tx, out, kept if keep_all else None, progress))


def _reply(job: Job, request: LoopRequest, tx: Transaction, out: Any, kept: list[Any] | None,
           progress: _Progress) -> CallReply:
    """The outputs and pulled states, copied to the host in one ``device_get``."""
    weak_types = tuple(map(_is_weak, jax.tree_util.tree_leaves(out)))
    written = list(progress.written)
    wanted = list(dict.fromkeys(written + list(request.pull_ids))) if request.pull else []
    pulled = [(i, tx.current(s)) for i in wanted if (s := tx.lookup(i)) is not None]
    try:
        outputs, values = to_host((out if kept is None else kept, pulled), f"job {job.id}")
    except ServerError as exc:  # to_host's text is a call's; here every step did commit
        raise ServerError(f"job {job.id}: every step committed, but copying the outputs to "
                          f"the host failed ({exc.__cause__}); the states are those of the "
                          "last step, and the job has no result.") from exc
    if kept is not None:
        outputs = jax.tree_util.tree_map(lambda *rows: np.stack(rows), *outputs)
    # The host copies come after every step committed: a failed copy loses no step.
    return CallReply(
        call_id=job.id, written=tuple(written), compiled=progress.compiled,
        state_versions=progress.versions, uploaded_versions=progress.uploaded_versions,
        weak_types=weak_types, results=pack(outputs, refs=False, code=False),
        states=pack(values, refs=False, code=False) if request.pull else None)
