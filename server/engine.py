"""What the binary endpoints do on a worker thread: run a call, push and pull states.

Every function here runs with the locks of the states it touches held (see
``scheduler.py``). A call stages uploaded values, resolves the callable
(cache, or unpickle with ``persistent_load`` handing out resident states),
runs it, and only then commits: on any failure every state is put back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import traceback
from dataclasses import dataclass, field
from typing import Any

import jax

from statehost import State
from statehost._wire import Encoded, Frame, encode, pack
from statehost.random import RandomState, use_default_stream
from statehost.server.errors import ApiError
from statehost.server.functions import CachedFunction, FunctionCache
from statehost.server.runtime import Runtime
from statehost.server.store import Session, StateStore
from statehost.transform import StatefulFunction, StatefulMapping

__all__ = ["CallResult", "pull_states", "push_states", "run_call"]

_HEX_ID = re.compile(r"^[0-9a-f]{32}$")

_MSG_MISSING_STATES = (
    "{where}: this session has no state with id {ids}. The server frees a session's states "
    "when the session is deleted or idle past its TTL, and a state made by another session "
    "is not visible here. Fix: push the values again (client.push(module)) or re-run the "
    "call, which uploads states the server lacks."
)
_MSG_CONFLICT = (
    "{where}: refused a lost update, nothing was committed. {lines}. Someone committed a newer "
    "value since this client last synced. Fix: client.pull(...) the state (dropping the local "
    "change) and re-run, or pass retries=N to client.pmap/vmap/jit to do that automatically."
)
_MSG_MISSING_MODULE = (
    "{where}: unpickling the callable needs module {module!r}, which the server cannot "
    "import ({exc}). Fix it in one of these ways:\n"
    "  1. install {module!r} in the server's environment;\n"
    "  2. define the code in the notebook or script (__main__), which cloudpickle ships "
    "by value;\n"
    "  3. call cloudpickle.register_pickle_by_value({module}) on the client before the call."
)


# -- staging: uploaded values, undone on failure -------------------------------
@dataclass
class _Staging:
    store: StateStore
    session: Session
    old: dict[str, tuple[State, Any, int]] = field(default_factory=dict)
    new: dict[str, State] = field(default_factory=dict)
    loaded: set[str] = field(default_factory=set)
    conflicts: list[dict[str, Any]] = field(default_factory=list)

    def lookup(self, state_id: str) -> State | None:
        return self.new.get(state_id) or self.store.get(state_id, self.session)

    def stage(self, records: Any, where: str, bases: Any = None) -> list[str]:
        """Puts uploaded ``(cls, id, name, tag, value)`` records in place; returns ids.

        ``bases`` maps a state id to the version its uploaded value was based on;
        an upload based on an older version than the server's is a lost update,
        refused with 409 (:data:`_MSG_CONFLICT`), and nothing is staged.
        """
        if records is None:
            return []
        if not isinstance(records, list):
            raise ApiError(400, "ProtocolError", f"{where}: the states section is not a list.")
        bases = bases if isinstance(bases, dict) else {}
        ids = []
        for record in records:
            cls, state_id, name, tag, value = _check_record(record, where)
            state = self.lookup(state_id)
            meta = self.store.meta(state_id) if state is not None else None
            if meta is not None and bases.get(state_id) != meta.version:
                self.conflicts.append({
                    "id": state_id, "name": meta.name or name or state_id[:8],
                    "server_version": meta.version, "base_version": bases.get(state_id),
                    "writer": meta.writer,
                })
                continue
            value = jax.device_put(value)
            if state is None:
                state = cls.__new__(cls)
                state.__setstate__({"value": value, "id": state_id, "name": name, "tag": tag})
                self.new[state_id] = state
            else:
                self.old.setdefault(state_id, (state, state._value, state._writes))
                state._value = value
            ids.append(state_id)
        if self.conflicts:
            lines = "; ".join(
                f"{c['name']}: the server has version {c['server_version']} (by {c['writer']}), "
                f"the upload is based on version {c['base_version']}" for c in self.conflicts)
            raise ApiError(409, "StateConflictError", _MSG_CONFLICT.format(
                where=where, lines=lines), conflicts=self.conflicts)
        return ids

    def load_ref(self, ref: Any) -> State:
        """``persistent_load``: a state reference becomes the resident ``State`` itself."""
        if not (isinstance(ref, tuple) and len(ref) == 5 and ref[0] == "state"):
            raise ApiError(400, "ProtocolError", f"unknown persistent reference {ref!r:.100}.")
        state = self.lookup(ref[1]) if isinstance(ref[1], str) else None
        if state is None:
            raise ApiError(404, "StateNotFoundError", _MSG_MISSING_STATES.format(
                where="POST /v1/call", ids=ref[1]), missing=[ref[1]])
        self.loaded.add(state.id)
        return state

    def rollback(self) -> None:
        for state, value, writes in self.old.values():
            state._value = value
            state._writes = writes
        self.new.clear()

    def commit(self) -> None:
        for state in self.new.values():
            self.store.add(state, self.session)


def _check_record(record: Any, where: str) -> tuple[type[State], str, Any, Any, Any]:
    ok = (
        isinstance(record, tuple)
        and len(record) == 5
        and isinstance(record[0], type)
        and issubclass(record[0], State)
        and isinstance(record[1], str)
        and _HEX_ID.match(record[1])
    )
    if not ok:
        raise ApiError(
            400, "ProtocolError",
            f"{where}: a state record must be (State subclass, 32-hex id, name, tag, value); "
            f"got {record!r:.120}. Fix: send states with statehost's client.",
        )
    return record


# -- unpickling and errors -------------------------------------------------------
def _unpickle(frame: Frame, name: str, load_state: Any, where: str) -> Any:
    try:
        return frame.section(name, load_state)
    except ApiError:
        raise
    except ModuleNotFoundError as exc:
        raise ApiError(
            400, "PayloadError",
            _MSG_MISSING_MODULE.format(where=where, module=exc.name, exc=exc),
            missing_module=exc.name,
        ) from exc
    except Exception as exc:
        raise ApiError(
            400, "PayloadError",
            f"{where}: the {name} section could not be unpickled ({type(exc).__name__}: "
            f"{exc}). The payload is corrupt, or was pickled by an incompatible client. "
            "Fix: send it with statehost's client of the same version as the server.",
        ) from exc


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
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(
        _INTERNAL)]
    text = "".join(traceback.format_exception_only(exc))
    # JAX appends a note about its own frame filtering, which means nothing remotely.
    text = text.split("\n--------------------\nFor simplicity, JAX has removed", 1)[0]
    text = text if text.endswith("\n") else text + "\n"
    if not frames:
        return text
    return "Traceback (most recent call last):\n" + "".join(traceback.format_list(frames)) + text


def _user_error(exc: Exception, where: str) -> ApiError:
    kind = type(exc).__qualname__
    return ApiError(
        422, "RemoteExecutionError", f"{where}: the function raised {kind}: {exc}",
        traceback=_user_traceback(exc), exception_type=kind,
    )


# -- the call -------------------------------------------------------------------
@dataclass
class CallResult:
    frame: Encoded
    bytes_out: dict[str, int]
    compiled: int
    cached: bool


def _transform(
    frame: Frame, staging: _Staging, cache: FunctionCache, session: Session, key_extra: str
) -> tuple[Any, bool]:
    spec = frame.header.get("function")
    if not isinstance(spec, dict) or not isinstance(spec.get("digest"), str):
        raise ApiError(400, "ProtocolError", "POST /v1/call: header.function.digest is missing.")
    key = f"{session.id}:{spec['digest']}:{key_extra}"
    hit = cache.get(key)
    if hit is not None:
        staging.loaded |= hit.state_ids
        return hit.transform, True
    if not frame.has("function"):
        raise ApiError(
            409, "FunctionNotCachedError",
            "POST /v1/call: the server has no cached callable with digest "
            f"{spec['digest'][:16]}...; send the function section again.",
        )
    digest = hashlib.sha256(frame.section_buffers("function")[0]).hexdigest()
    if digest != spec["digest"]:
        raise ApiError(
            400, "ProtocolError",
            f"POST /v1/call: header.function.digest {spec['digest'][:16]}... does not match "
            f"the function section's sha256 {digest[:16]}....",
        )
    before = set(staging.loaded)
    transform = _unpickle(frame, "function", staging.load_ref, "POST /v1/call")
    if not isinstance(transform, StatefulMapping | StatefulFunction):
        raise ApiError(
            400, "ProtocolError",
            f"POST /v1/call: the function section holds {type(transform).__name__}, not a "
            "statehost transform. Fix: wrap it with client.pmap / client.vmap / client.jit.",
        )
    cache.put(key, CachedFunction(transform, frozenset(staging.loaded - before)))
    return transform, False


def run_call(frame: Frame, session: Session, rt: Runtime, locked: set[str]) -> CallResult:
    """Runs ``POST /v1/call``; every state is unchanged if anything fails."""
    header = frame.header
    where = "POST /v1/call"
    staging = _Staging(rt.store, session)
    cache = rt.functions
    try:
        uploaded = staging.stage(_unpickle(frame, "states", None, where), where,
                                 header.get("uploads"))
        refs = header.get("refs", [])
        missing = [i for i in refs if staging.lookup(i) is None]
        if missing:
            raise ApiError(404, "StateNotFoundError", _MSG_MISSING_STATES.format(
                where=where, ids=", ".join(missing)), missing=missing)
        stream_id = header.get("default_stream")
        stream = staging.lookup(stream_id) if isinstance(stream_id, str) else None
        if stream_id is not None and not isinstance(stream, RandomState):
            raise ApiError(404, "StateNotFoundError", _MSG_MISSING_STATES.format(
                where=where, ids=stream_id), missing=[stream_id])
        transform, cached = _transform(frame, staging, cache, session, stream_id or "")
        args, kwargs = _unpickle(frame, "args", staging.load_ref, where)
        outside = staging.loaded - locked
        if outside:
            raise ApiError(400, "ProtocolError",
                           f"{where}: the payload uses states {sorted(outside)} that "
                           "header.refs does not list.")
        touched = [staging.lookup(i) for i in staging.loaded | ({stream_id} - {None})]
        writes = {s.id: s._writes for s in touched}
        misses = transform.cache_info().misses
        try:
            ctx = use_default_stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx:
                out = transform(*args, **kwargs)
            written = [s.id for s in touched if s._writes != writes[s.id]]
            wanted = []
            if header.get("pull"):
                wanted = list(dict.fromkeys(written + list(header.get("pull_ids", []))))
            # One device_get for outputs and states: their copies to host overlap.
            out, values = jax.device_get((out, _current(wanted, staging)))
        except Exception as exc:
            raise _user_error(exc, where) from exc
    except BaseException:
        staging.rollback()
        raise
    staging.commit()
    # An upload is a commit (version + 1), and so is the call's write after it.
    rt.commit([i for i in uploaded if i not in staging.new], session, durable=False)
    as_uploaded = {i: rt.store.meta(i).version for i in uploaded}
    rt.commit(written, session)
    versions = {s.id: rt.store.meta(s.id).version for s in touched}
    sections = {"results": pack(out, refs=False, code=False)}
    if header.get("pull"):
        sections["states"] = pack(values, refs=False, code=False)
    compiled = transform.cache_info().misses - misses
    reply = encode({"written": written, "compiled": compiled, "state_versions": versions,
                    "uploaded_versions": as_uploaded}, sections)
    sizes = {name: s.nbytes for name, s in sections.items()}
    return CallResult(reply, sizes, compiled, cached)


def _current(ids: list[str], staging: _Staging) -> list[tuple[str, Any]]:
    """``(id, value)`` of each state in ``ids`` that this session can see."""
    states = [(i, staging.lookup(i)) for i in ids]
    return [(i, s._value) for i, s in states if s is not None]


# -- push and pull --------------------------------------------------------------
def push_states(frame: Frame, session: Session, rt: Runtime) -> Encoded:
    """``POST /v1/states/push``: stores uploaded values (all of them, or none)."""
    staging = _Staging(rt.store, session)
    where = "POST /v1/states/push"
    try:
        ids = staging.stage(_unpickle(frame, "states", None, where), where,
                            frame.header.get("uploads"))
    except BaseException:
        staging.rollback()
        raise
    staging.commit()
    rt.commit([i for i in ids if i not in staging.new], session)
    return encode({"stored": ids, "state_versions": {i: rt.store.meta(i).version for i in ids}})


def pull_states(frame: Frame, session: Session, rt: Runtime) -> Encoded:
    """``POST /v1/states/pull``: the current values of ``header.ids``."""
    ids = frame.header.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ApiError(400, "ProtocolError",
                       "POST /v1/states/pull: header.ids must be a list of state ids.")
    staging = _Staging(rt.store, session)
    missing = [i for i in ids if staging.lookup(i) is None]
    if missing:
        raise ApiError(404, "StateNotFoundError", _MSG_MISSING_STATES.format(
            where="POST /v1/states/pull", ids=", ".join(missing)), missing=missing)
    values = jax.device_get(_current(ids, staging))
    versions = {i: rt.store.meta(i).version for i in ids}
    return encode({"state_versions": versions}, {"states": pack(values, refs=False, code=False)})
