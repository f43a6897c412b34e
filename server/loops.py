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
dispatch, and a cancel stops it within a few steps. The arguments that are the same
every step (``args``, ``kwargs``) are placed on the devices once, where the step's
program reads them (:func:`_placed_once`), instead of being copied there every step.

In a group of processes, :class:`LoopRun` runs the same steps on every process: the
leader's job decides each one and sends it to the followers as an operation just before
running it (``server/cluster.py``, "Loops and jobs"); the arguments are global arrays, as
a call's (``server/placement.py``).
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from statehost.random import RandomState
from statehost.server.admission import NotAdmitted
from statehost.server.callable_cache import unpickle
from statehost.server.dispatch_window import program_marker
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
from statehost.server.placement import global_arguments
from statehost.server.staging import _MSG_MISSING_STATES, Transaction
from statehost.transform import StatefulFunction, StatefulMapping
from statehost.wire import CallReply, LoopRequest, pack

if TYPE_CHECKING:
    from statehost.server.calls import Call
    from statehost.server.jobs import Job
    from statehost.server.runtime import Runtime

__all__ = ["LoopRun", "check_over", "end_unstarted", "run_loop"]

_WHERE = "POST /v1/jobs"
# How many dispatched steps the device may still be working on. One costs a wait on the
# device per step (+25% per tiny pmap step, 2 busy cores); two hide it.
_AHEAD = 2

_MSG_OVER_AXES = (
    "{where}: over= must be a pytree of arrays whose leading axis has one row per step "
    "(steps={steps}); {problems}. Fix: pass arrays of shape (steps, ...), e.g. "
    "over=batches[:steps], or set steps=len(batches)."
)
_MSG_OVER_TREE = (
    "{where}: over= must be a pytree JAX can take apart; flattening it raised {why:.300}. "
    "Fix: pass arrays, or tuples, lists and dicts of them (a dict's keys all strings, or "
    "all numbers)."
)
_MSG_GONE = (
    "job {job}: states {ids} were freed while the loop ran: their named object was deleted "
    "(client.delete, DELETE /v1/namespaces/{{ns}}/objects/{{name}}) or replaced by a new "
    "put. Fix: cancel the job (job.cancel()) before deleting or re-putting its object."
)
_MSG_STOPPED = (
    "{where}: job {job} was {what} after {completed} of {steps} step(s); every state keeps "
    "the value its step {completed} committed{none}."
)


def check_over(over: Any, steps: int, where: str = _WHERE) -> tuple[list[Any], Any]:
    """``over``'s leaves and structure, or a 422 naming each leaf without ``steps`` rows
    (or saying why JAX cannot take it apart)."""
    try:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(over)
    except Exception as exc:  # a dict whose keys do not sort (1 and "a"), say
        raise ValidationError(_MSG_OVER_TREE.format(
            where=where, why=f"{type(exc).__name__}: {exc}")) from exc
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
    run = LoopRun(call, request, rt)
    try:
        _steps(run, job)
    except NotAdmitted:  # its first step does not fit now: back to the queue, job queued
        raise
    except ApiError as exc:
        _fail(job, exc, run.progress)
        raise
    except BaseException as exc:
        _fail(job, ServerError(
            f"{_WHERE}: job {job.id} failed in the server ({type(exc).__name__}: {exc}).",
            traceback=None), run.progress)
        raise


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
        _MSG_STOPPED.format(where=_WHERE, job=job.id, what=what, completed=done,
                            steps=job.steps, none=" (none ran: nothing changed)" if not done
                            else ""),
        reason=reason, job=job.id, **progress.extra())
    job.stop(reason, exc.body(), exc.status)


def _wait(array: jax.Array, step: int, job_id: str) -> None:
    """Waits for step ``step``'s program; an error it met on the device is the user's."""
    try:
        array.block_until_ready()
    except Exception as exc:
        # Device errors surface when a result is awaited, after the step was committed.
        raise _user_error(exc, f"{_WHERE}: job {job_id}: step {step + 1}'s program failed on "
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


def _identity(x: Any) -> Any:
    return x


def _placed_once(transform: Any, args: tuple, kwargs: dict, n_dyn: int) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with their numpy arrays put where the step's program reads
    them, once for the whole loop: a ``jit`` (and a ``vmap``, which runs jitted) on the
    default device, a ``pmap`` sharded over the lanes of the arguments it maps on axis 0
    (as ``jax.pmap`` itself shards them). Each step then passes arrays already in place
    instead of copying the same host values to the devices again (about half a tiny pmap
    step's dispatch). The values, dtypes and weak types are the same, so the step computes
    and traces exactly what it did. Anything else stays as it is: a transform that donates
    arguments (a donated buffer is gone after the first step), has static arguments or is
    pinned to devices, pmap arguments broadcast or mapped on another axis, and values that
    are not plain numpy arrays of a canonical dtype.
    """
    if getattr(transform, "_static_argnums", ()):
        return args, kwargs
    if isinstance(transform, StatefulFunction):
        if transform.donate_argnums:
            return args, kwargs
        put, axes = jax.device_put, None
    elif isinstance(transform, StatefulMapping):
        mapping_fn = transform.mapping_fn
        if mapping_fn is jax.vmap or getattr(mapping_fn, "func", None) is jax.vmap:
            put, axes = jax.device_put, None  # a vmap runs under jax.jit
        elif getattr(mapping_fn, "devices", 0) is None and \
                getattr(mapping_fn, "backend", 0) is None and \
                getattr(mapping_fn, "donate_argnums", None) == ():  # pmap's, on its own
            try:
                put, axes = jax.pmap(_identity), transform._dyn_in_axes(n_dyn)
            except ValueError:  # in_axes that do not fit the arguments: the step says so
                return args, kwargs
        else:
            return args, kwargs
    else:
        return args, kwargs

    def place(leaf: Any) -> Any:
        if type(leaf) is not np.ndarray or jax.dtypes.canonicalize_dtype(leaf.dtype) != \
                leaf.dtype or (axes is not None and leaf.ndim == 0):
            return leaf
        try:
            return put(leaf)
        except Exception:  # noqa: BLE001  the step meets (and reports) what is wrong with it
            return leaf

    try:
        if axes is None:
            return jax.tree_util.tree_map(place, (args, kwargs))
        # pmap: the arguments it maps on axis 0, and kwargs (which it always maps on axis
        # 0); one it broadcasts, or maps on another axis, is left for pmap to place.
        placed = tuple(jax.tree_util.tree_map(place, arg) if type(axis) is int and axis == 0
                       else arg for arg, axis in zip(args, axes, strict=False))
        return placed, jax.tree_util.tree_map(place, kwargs)
    except Exception:  # noqa: BLE001  arguments JAX cannot take apart: the step says why
        return args, kwargs


def end_unstarted(job: Job) -> None:
    """Ends a job whose call was cancelled before it started (nothing ran)."""
    _stopped(job, job.reason or "cancelled", _Progress())


# -- one loop's steps, on every process --------------------------------------------
class LoopRun:
    """One loop's steps on this process, in the order its driver says.

    On the leader (or one process) the driver is the job (:func:`_steps`): it alone decides
    when the loop stops (completed, cancelled, timed out, a step failed). In a group, each
    decision is an operation of the leader's one order, sent just before the leader acts
    on it (``share``): ``loop`` (``begin``), ``step`` (``step(i)``) and ``loop_end`` (the
    ``reply``, or the end without one); a follower replays them on a run of its own
    (``server/follower.py``), so it never runs a step the leader does not, nor stops
    before it (``server/cluster.py``).
    """

    def __init__(self, call: Call, request: LoopRequest, rt: Runtime):
        self.call, self.request, self.rt = call, request, rt
        self.progress = _Progress()
        self.loaded: frozenset[str] = frozenset()  # the states its callable and args load
        self._shared = False  # the followers began it, and were not told it ended
        self._tx: Transaction | None = None  # begin's until step 0 ran, then the last step's
        self._staged = False  # begin's transaction holds uploads no step committed yet
        # What begin resolved and unpickled once, for every step.
        self._transform: Any = None
        self._stream: RandomState | None = None
        self._args: tuple = ()
        self._kwargs: dict[str, Any] = {}
        self._rows: list[Any] | None = None
        self._rows_tree: Any = None
        self._misses = 0  # the transform's cache misses before the first step compiled
        self._out: Any = None
        self._kept: list[Any] = []
        self._behind: collections.deque[Any] = collections.deque()  # an array per step in flight

    def share(self, kind: str, message: Any = None, **extra: Any) -> None:
        """In a group, sends this loop's next operation to every follower (the leader's;
        on one process, nothing)."""
        self.rt.share(self.call, message, _WHERE, kind=kind, **extra)
        self._shared = self.rt.group is not None and kind != "loop_end"

    def begin(self) -> None:
        """Stages the uploads, resolves the callable and unpickles the arguments, once;
        admits the first step's program by device memory (``NotAdmitted``: not now)."""
        call, request, rt = self.call, self.request, self.rt
        session = call.session
        assert session is not None
        tx = Transaction(rt, session, _WHERE)
        try:
            tx.stage(request.states, request.uploads)
            tx.require(request.refs)
            self._stream = _stream(request, tx)
            self.share("loop", request)  # what only the leader checks is checked
            transform, _ = _resolve(request, tx, rt, session)
            args, kwargs, over = _load_args(request, tx)
            outside = tx.loaded - set(call.keys)
            if outside:
                raise ProtocolError(f"{_WHERE}: the payload uses states {sorted(outside)} "
                                    "that header.refs does not list.")
            self._rows, self._rows_tree = (None, None) if over is None else \
                check_over(over, request.steps)
            if jax.process_count() > 1:  # global arrays, as a call's (server/placement.py)
                args, kwargs = global_arguments((args, kwargs))
            self._transform, self._args, self._kwargs = transform, args, kwargs
            # Admitted by device memory like a call: the first step's program is estimated
            # (and compiled) here; its reservation holds until the loop's call ends.
            self._misses = transform.cache_info().misses
            try:
                _admit(call, rt, tx, transform, self._step_args(0), kwargs, self._stream,
                       _WHERE)
            except NotAdmitted:  # what it compiled counts when it runs
                call.compiled_before += transform.cache_info().misses - self._misses
                raise
        except BaseException:
            tx.rollback()
            raise
        self._tx, self._staged, self.loaded = tx, True, frozenset(tx.loaded)
        if jax.process_count() == 1:  # a group's are global arrays already
            self._args, self._kwargs = _placed_once(transform, args, kwargs, len(args) + (
                self._rows is not None))

    def _step_args(self, i: int) -> tuple:
        if self._rows is None:
            return self._args
        row = jax.tree_util.tree_unflatten(self._rows_tree, [x[i] for x in self._rows])
        return (*self._args, global_arguments(row))

    def step(self, i: int) -> None:
        """Runs step ``i`` and commits it (a failure rolls it back, and is raised). The
        device runs at most ``_AHEAD`` steps behind: this waits for step ``i - _AHEAD``."""
        session = self.call.session
        assert session is not None and self._tx is not None
        if self._staged:
            tx, self._staged = self._tx, False
        else:
            tx = Transaction(self.rt, session, _WHERE)
            tx.loaded |= self.loaded
        try:
            out = _run(tx, self._transform, self._step_args(i), self._kwargs, self._stream,
                       _WHERE)
            marker = program_marker(out, list(tx.pending.values.values()))
            self._behind.append(marker)
            done = tx.commit()
        except BaseException:
            tx.rollback()
            raise
        self._tx, self._out = tx, out
        progress = self.progress
        if i == 0:
            progress.uploaded_versions = done.uploaded_versions
        progress.written.update(dict.fromkeys(done.written))
        progress.versions.update(done.versions)
        progress.completed = i + 1
        if self.request.keep == "all":
            self._kept.append(out)
        if len(self._behind) > _AHEAD:
            oldest = self._behind.popleft()
            if oldest is not None:
                _wait(oldest, i - _AHEAD, self.call.id)
        self.rt.window.dispatched(marker)  # with every other call's and loop's programs

    def reply(self) -> CallReply:
        """The result, once every step committed (a gather in a group: every process)."""
        assert self._tx is not None
        progress = self.progress
        progress.compiled = self._transform.cache_info().misses - self._misses + \
            self.call.compiled_before
        return _reply(self.call.id, self.request, self._tx, self._out,
                      self._kept if self.request.keep == "all" else None, progress)

    def end(self) -> None:
        """Ends the loop without a reply: rolls back what ``begin`` staged if no step ran;
        the leader tells the followers to end theirs (unless the group is lost: then
        nothing more is sent, and they go with it)."""
        if self._staged:
            assert self._tx is not None
            self._tx.rollback()
            self._staged = False
        group = self.rt.group
        if self._shared and group is not None and group.problem() is None:
            self.share("loop_end", reply=False)


def _steps(run: LoopRun, job: Job) -> None:
    """The leader's (or one process's) loop: decides each step, and how the job ends."""
    reason = job.should_stop()
    if reason is not None:
        _stopped(job, reason, run.progress)
        return
    store = run.rt.store
    try:
        run.begin()
        job.start()
        for i in range(job.steps):
            if i:
                reason = job.should_stop()
                if reason is not None:
                    _stopped(job, reason, run.progress)
                    return
                _check_resident(job, run.loaded, store)
            run.share("step", step=i)
            try:
                run.step(i)
            except BaseException as exc:
                reason = job.should_stop()
                if reason is not None and _freed(run.loaded, store):
                    # Cancelled, and its named object deleted mid-step: the cancel is the story.
                    _stopped(job, reason, run.progress)
                    return
                _check_resident(job, run.loaded, store, exc)  # freed during the step: say so
                raise
            job.done = i + 1
        run.share("loop_end", reply=True)
        job.complete(run.reply())
    finally:
        run.end()


def _reply(job_id: str, request: LoopRequest, tx: Transaction, out: Any,
           kept: list[Any] | None, progress: _Progress) -> CallReply:
    """The outputs and pulled states, copied to the host in one ``device_get``."""
    weak_types = tuple(map(_is_weak, jax.tree_util.tree_leaves(out)))
    written = list(progress.written)
    wanted = list(dict.fromkeys(written + list(request.pull_ids))) if request.pull else []
    pulled = [(i, tx.current(s)) for i in wanted if (s := tx.lookup(i)) is not None]
    try:
        outputs, values = to_host((out if kept is None else kept, pulled), f"job {job_id}")
    except ServerError as exc:  # to_host's text is a call's; here every step did commit
        raise ServerError(f"job {job_id}: every step committed, but copying the outputs to "
                          f"the host failed ({exc.__cause__}); the states are those of the "
                          "last step, and the job has no result.") from exc
    if kept is not None:
        outputs = jax.tree_util.tree_map(lambda *rows: np.stack(rows), *outputs)
    # The host copies come after every step committed: a failed copy loses no step.
    return CallReply(
        call_id=job_id, written=tuple(written), compiled=progress.compiled,
        state_versions=progress.versions, uploaded_versions=progress.uploaded_versions,
        weak_types=weak_types, results=pack(outputs, refs=False, code=False),
        states=pack(values, refs=False, code=False) if request.pull else None)
