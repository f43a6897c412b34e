"""Running user code: a shipped call (``POST /v1/call``) and a registered function's invoke.

Both run on a worker thread inside a :class:`~statehost.server.calls.Call` that
holds the locks of every state they touch, and both change states through one
:class:`~statehost.server.staging.Transaction`: uploads staged, the transform run
with its writes deferred, outputs and pulled states copied to the host, and
only then the commit. An exception in the user's function is a 422
``RemoteExecutionError`` with the traceback from the user's own frames on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax

from statehost.random import RandomState, use_default_stream
from statehost.server.admission import Demand, NotAdmitted, is_out_of_memory, out_of_memory
from statehost.server.callable_cache import (
    CachedFunction,
    RecordingLoader,
    Transform,
    check_digest,
    load_transform,
    share_programs,
    unpickle,
)
from statehost.server.dispatch_window import program_marker
from statehost.server.errors import (
    FunctionNotCachedError,
    ProtocolError,
    RemoteExecutionError,
    ServerError,
    StateNotFoundError,
    ValidationError,
)
from statehost.server.placement import gathered, global_arguments
from statehost.server.staging import _MSG_MISSING_STATES, Transaction
from statehost.wire import CallReply, CallRequest, handle_name, outputs_signature, pack

if TYPE_CHECKING:
    from statehost.server.calls import Call
    from statehost.server.runtime import Runtime
    from statehost.server.store import Session

__all__ = ["CallResult", "InvokeResult", "invoke", "run_call"]

_WHERE = "POST /v1/call"

# Frames from these folders are the server's, the core's or JAX's, never the user's.
_INTERNAL = tuple(
    os.path.dirname(path) + os.sep
    for path in (
        __file__,
        __import__("statehost").__file__,
        jax.__file__,
        __import__("jaxlib").__file__,
        contextlib.__file__,
    )
)


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the user's own code on: server, core and JAX frames dropped."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(_INTERNAL)]
    try:
        text = "".join(traceback.format_exception_only(exc))
    except Exception:  # the user's __str__ raised
        text = f"{type(exc).__qualname__}: {_text(exc)}\n"
    # JAX appends a note about its own frame filtering, which means nothing remotely.
    text = text.split("\n--------------------\nFor simplicity, JAX has removed", 1)[0]
    text = text if text.endswith("\n") else text + "\n"
    if not frames:
        return text
    return "Traceback (most recent call last):\n" + "".join(traceback.format_list(frames)) + text


def _text(exc: BaseException) -> str:
    """``str(exc)``, or the class name when the user's ``__str__`` raises."""
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__qualname__} whose str() raised>"


def _user_error(exc: BaseException, where: str) -> RemoteExecutionError:
    kind, text = type(exc).__qualname__, _text(exc)
    return RemoteExecutionError(
        f"{where}: the function raised {kind}: {text}", traceback=_user_traceback(exc),
        exception_type=kind, exception_module=type(exc).__module__, exception_message=text,
    )


def _run(tx: Transaction, transform: Transform, args: Any, kwargs: Any,
         stream: RandomState | None, where: str, demand: Demand | None = None) -> Any:
    """Runs the transform with its writes deferred; a failure is the user's (422), but XLA
    running out of device memory is a ``DeviceMemoryError`` (507)."""
    try:
        ctx = use_default_stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx, tx.running():
            return transform(*args, **kwargs)
    except BaseException as exc:  # SystemExit too: this worker thread is no real interrupt's
        if is_out_of_memory(exc):
            raise out_of_memory(exc, where, demand) from exc
        raise _user_error(exc, where) from exc


# -- admission by device memory (statehost.server.admission) --------------------------------
def _admit(call: Call, rt: Runtime, tx: Transaction, transform: Transform, args: Any,
           kwargs: Any, stream: RandomState | None, where: str) -> Demand | None:
    """Reserves the call's estimated device memory before anything runs, or sends it back
    to the queue (``NotAdmitted``) or fails it (``DeviceMemoryError``). The first call of a
    signature compiles its program here (JAX reuses that compilation for the run)."""
    admission = rt.scheduler.admission
    lower = getattr(transform, "lower", None)
    if admission is None or lower is None:
        return None
    states = [tx.current(s) for s in map(tx.lookup, call.keys) if s is not None]
    signature = _signature((args, kwargs, states))
    known, demand = admission.cached(transform, signature)
    if not known:
        try:
            ctx = use_default_stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx, tx.running():
                lowered = lower(*args, **kwargs)
            demand = None if lowered is None else Demand.of(lowered.compile())
        except BaseException as exc:  # tracing the user's function: the user's error
            if is_out_of_memory(exc):
                raise out_of_memory(exc, where, None) from exc
            raise _user_error(exc, where) from exc
        admission.remember(transform, signature, demand)
    if demand is not None:
        rt.scheduler.admit(call, demand)
    return demand


def _signature(tree: Any) -> Any:
    """What a program's memory depends on: the structure, shapes, dtypes and shardings of
    its arguments and states, and the values of its other (static) leaves."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    out: list[Any] = [treedef]
    for leaf in leaves:
        shape = getattr(leaf, "shape", None)
        if shape is not None and hasattr(leaf, "dtype"):
            out.append((tuple(shape), str(leaf.dtype), getattr(leaf, "sharding", None)))
        elif isinstance(leaf, bool | int | float | complex):  # traced, weakly typed: no value
            out.append(type(leaf).__name__)
        else:
            try:
                hash(leaf)
                out.append((type(leaf).__name__, leaf))
            except TypeError:
                out.append(type(leaf).__name__)
    return tuple(out)


def to_host(tree: Any, where: str) -> Any:
    """One ``device_get`` for outputs and states: their copies to the host overlap.

    In a group of processes, arrays this process holds only part of are gathered first
    (``placement.gathered``: the followers send their shards over the operation stream;
    every process runs the same operation, so every one gets here in the same order).

    A failure here is the server's (the run succeeded): a 500 that says nothing
    was applied, which is true because the commit comes after it.
    """
    try:
        if jax.process_count() > 1:
            tree = gathered(tree)
        return jax.device_get(tree)
    except Exception as exc:
        raise ServerError(
            f"{where}: copying the results to the host failed ({type(exc).__name__}: "
            f"{exc}). The call was not applied: every state keeps its previous value.",
        ) from exc


def _is_weak(leaf: Any) -> bool:
    """Whether an output leaf is a weakly typed array (its host copy forgets it)."""
    return isinstance(leaf, jax.Array) and jax.typeof(leaf).weak_type


_MSG_OUTPUTS_CHANGED = (
    "{where}: the call returned {got}, and the client expected {want} (what the first call "
    "with these argument shapes returned). The call was not applied. This happens when a "
    "call's outputs depend on state shapes that changed on the server. Fix: run it again; "
    "the client then runs it synchronously once, and learns the new outputs."
)


def _describe(leaf: Any) -> tuple[tuple[int, ...], str, bool] | str:
    if isinstance(leaf, jax.Array):
        return _describe_aval(jax.typeof(leaf))
    return type(leaf).__name__


@functools.lru_cache(maxsize=512)
def _describe_aval(aval: Any) -> tuple[tuple[int, ...], str, bool]:
    """An output's (shape, dtype name, weak type), once per abstract value: a warm call's
    outputs repeat the last call's, and ``str(dtype)`` alone costs ~3 us (numpy builds the
    name in Python each time). A pure function of a hashable value: nothing to clear."""
    return tuple(aval.shape), str(aval.dtype), bool(aval.weak_type)


# -- POST /v1/call --------------------------------------------------------------
@dataclass
class CallResult:
    reply: CallReply
    compiled: int
    cached: bool


def _resolve(request: CallRequest, tx: Transaction, rt: Runtime, session: Session
             ) -> tuple[Transform, bool]:
    """The callable: from the session's cache, or unpickled from the function section."""
    key = f"{session.id}:{request.digest}:{request.default_stream or ''}"
    hit = rt.functions.get(key)
    if hit is not None:
        tx.loaded |= hit.state_ids
        return hit.transform, True
    if request.function is None:
        raise FunctionNotCachedError(
            f"{_WHERE}: the server has no cached callable with digest "
            f"{request.digest[:16]}...; send the function section again.")
    check_digest(request.function, request.digest, _WHERE)
    before = set(tx.loaded)
    load = RecordingLoader(tx.load_ref)  # the order of the states numbers them for sharing
    transform = load_transform(request.function, load, _WHERE)
    stream = tx.lookup(request.default_stream) if request.default_stream is not None else None
    share_programs(rt.functions.programs, transform, request.function, load.met, stream)
    rt.functions.put(key, CachedFunction(transform, frozenset(tx.loaded - before)))
    return transform, False


def run_call(call: Call, request: CallRequest, rt: Runtime) -> CallResult:
    """``POST /v1/call``: every state is unchanged unless the whole call succeeded."""
    session = call.session
    assert session is not None
    tx = Transaction(rt, session, _WHERE)
    try:
        tx.stage(request.states, request.uploads)
        tx.require(request.refs)
        stream = None
        if request.default_stream is not None:
            stream = tx.lookup(request.default_stream)
            if not isinstance(stream, RandomState):
                raise StateNotFoundError(
                    _MSG_MISSING_STATES.format(where=_WHERE, ids=request.default_stream),
                    missing=[request.default_stream])
        rt.share(call, request, _WHERE)  # a group's followers run it too (server/cluster.py)
        transform, cached = _resolve(request, tx, rt, session)
        args = global_arguments(unpickle(request.args, tx.load_ref, "args", _WHERE))
        if not (isinstance(args, tuple) and len(args) == 2 and isinstance(args[0], tuple)
                and isinstance(args[1], dict)):
            raise ProtocolError(f"{_WHERE}: the args section must hold (args tuple, kwargs "
                                f"dict); got {type(args).__name__}.")
        outside = tx.loaded - set(call.keys)
        if outside:
            raise ProtocolError(f"{_WHERE}: the payload uses states {sorted(outside)} that "
                                "header.refs does not list.")
        misses = transform.cache_info().misses
        try:
            demand = _admit(call, rt, tx, transform, args[0], args[1], stream, _WHERE)
        except NotAdmitted:  # back to the queue: what it compiled counts when it runs
            call.compiled_before += transform.cache_info().misses - misses
            raise
        out = _run(tx, transform, args[0], args[1], stream, _WHERE, demand)
        marker = program_marker(out, list(tx.pending.values.values()))
        compiled = transform.cache_info().misses - misses + call.compiled_before
        written = [s.id for s in tx.pending.states]
        wanted = list(dict.fromkeys(written + list(request.pull_ids))) if request.pull else []
        pulled = [(i, tx.current(s)) for i in wanted if (s := tx.lookup(i)) is not None]
        leaves = jax.tree_util.tree_leaves(out)
        described = [_describe(leaf) for leaf in leaves]  # once: weak types and the check
        weak_types = tuple(type(d) is tuple and d[2] for d in described)
        _check_outputs(request, described)
        if request.returns == "values":
            out, values = to_host((out, pulled), _WHERE)
            results = pack(out, refs=False, code=False)
        else:  # an asynchronous call that pulls nothing copies nothing
            values, results = (to_host(pulled, _WHERE) if pulled else []), None
        states = pack(values, refs=False, code=False) if request.pull else None
        done = tx.commit()
    except BaseException:
        created = list(tx.new)
        tx.rollback()
        if created:  # a callable cached by this call refers to states that never came to be
            rt.functions.evict_states(created)
        raise
    call.notes.update(compiled=compiled, bytes_in=request.args.nbytes + (
        0 if request.states is None else request.states.nbytes), bytes_out=(
        0 if results is None else results.nbytes) + (0 if states is None else states.nbytes))
    rt.window.dispatched(marker)  # committed: only when the devices lag behind, a wait
    if request.keep_outputs:  # only a committed call's outputs are kept
        session.handles.update(
            (handle_name(call.id, i), leaf) for i, leaf in enumerate(leaves))
    reply = CallReply(call_id=call.id, written=tuple(done.written), compiled=compiled,
                      state_versions=done.versions,
                      uploaded_versions=done.uploaded_versions, weak_types=weak_types,
                      results=results, states=states)
    return CallResult(reply, compiled, cached)


def _check_outputs(request: CallRequest,
                   described: list[tuple[tuple[int, ...], str, bool] | str]) -> None:
    """A kept call's outputs (``_describe``d) are what its client expects (else nothing is
    committed)."""
    if request.returns not in ("values", "none"):
        raise ProtocolError(f"{_WHERE}: header.returns must be 'values' or 'none', got "
                            f"{request.returns!r}.")
    if request.expect is not None:
        got = outputs_signature(described)
        if got != request.expect:
            raise ValidationError(_MSG_OUTPUTS_CHANGED.format(
                where=_WHERE, got=got or "no outputs", want=request.expect or "no outputs"))


# -- registered functions ---------------------------------------------------------
@dataclass
class InvokeResult:
    outputs: Any
    versions: dict[str, int]


def invoke(call: Call, transform: Transform, args: list[Any], kwargs: dict[str, Any],
           rt: Runtime, where: str) -> InvokeResult:
    """Runs a registered function on its named states (``call.keys``) and commits what it
    wrote; ``versions`` has every one of those states' versions after it."""
    assert call.session is not None
    tx = Transaction(rt, call.session, where)
    tx.loaded |= set(call.keys)
    try:
        demand = _admit(call, rt, tx, transform, args, kwargs, None, where)
        out = to_host(_run(tx, transform, args, kwargs, None, where, demand), where)
        done = tx.commit()
    except BaseException:
        tx.rollback()
        raise
    return InvokeResult(out, done.versions)
