"""Registered functions: a transform stored under ``namespace/name`` and invoked with JSON.

``POST /v1/functions/register`` (a frame: it carries the pickled transform, so it
needs scope ``submit``) stores the function section as sent for a call, with the
named states it uses and its input signature. Anyone with scope ``invoke`` on the
namespace can then run it with ``POST /v1/namespaces/{ns}/functions/{name}/invoke``
and JSON arguments; no pickle crosses that route. The stored payload is a frame
holding the function section (pickle and out-of-band buffers); it lives in SQLite
and so survives restarts.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
import types
from typing import Any

import jax
import numpy as np
from fastapi import APIRouter, Depends, Response
from pydantic import BaseModel, Field

from statehost._wire import Frame, Section, decode, encode
from statehost.server.deps import FrameBody, PrincipalDep, RuntimeDep, require_submit, require_token
from statehost.server.engine import _unpickle, _user_error
from statehost.server.errors import ApiError
from statehost.server.functions import CachedFunction
from statehost.server.named import split_name
from statehost.server.persistence import FunctionRow
from statehost.server.routes._frames import frame_response
from statehost.server.routes.namespaces import to_json
from statehost.transform import StatefulFunction, StatefulMapping

__all__ = ["InvokeBody", "router"]

router = APIRouter(tags=["functions"], dependencies=[Depends(require_token)])

_REGISTER = "POST /v1/functions/register"


class InvokeBody(BaseModel):
    """Arguments of a registered function, as JSON.

    An array is nested lists (ints become int32, floats float32) or
    ``{"data": nested lists, "dtype": "float32"}``; plain numbers stay Python scalars;
    other objects are pytrees (dicts) of those.
    """

    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


# -- signature --------------------------------------------------------------------
def _plain(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _signature(transform: Any) -> dict[str, Any]:
    fun = transform.origin_fun
    out: dict[str, Any] = {
        "transform": type(transform).__name__,
        "function": getattr(fun, "__qualname__", None) or type(fun).__qualname__,
    }
    try:
        params = inspect.signature(fun).parameters.values()
        out["parameters"] = [
            {"name": p.name, "kind": p.kind.name,
             **({} if p.default is inspect.Parameter.empty else {"default": _plain(p.default)}),
             **({} if p.annotation is inspect.Parameter.empty
                else {"annotation": p.annotation if isinstance(p.annotation, str)
                      else repr(p.annotation)})}
            for p in params
        ]
    except (TypeError, ValueError):
        out["parameters"] = None
    for attr in ("in_axes", "out_axes", "axis_name", "static_argnums"):
        if hasattr(transform, attr):
            out[attr] = _plain(getattr(transform, attr))
    return out


# -- unpickling a stored function -------------------------------------------------
def _loader(rt: Any, namespace: str, allowed: set[str] | None, loaded: set[str],
            where: str) -> Any:
    """``persistent_load`` that hands out the resident named states of ``namespace``."""

    def load(ref: Any) -> Any:
        if not (isinstance(ref, tuple) and len(ref) == 5 and ref[0] == "state"):
            raise ApiError(400, "ProtocolError", f"{where}: unknown persistent reference "
                           f"{ref!r:.100}.")
        state_id = ref[1] if isinstance(ref[1], str) else ""
        meta = rt.store.meta(state_id)
        state = rt.store.by_id(state_id)
        if (allowed is not None and state_id not in allowed) or meta is None \
                or state is None or meta.namespace != namespace:
            raise ApiError(
                422, "ValidationError",
                f"{where}: the function uses state {ref[3] or state_id[:8]!r} (id {state_id}), "
                f"which is not a named state of namespace {namespace!r}. A registered function "
                "may only use named states: put them first (client.put('ns/name', obj)).",
                state=state_id,
            )
        loaded.add(state_id)
        return state

    return load


def _check_transform(transform: Any, where: str) -> None:
    if not isinstance(transform, StatefulMapping | StatefulFunction):
        raise ApiError(
            400, "ProtocolError",
            f"{where}: the function section holds {type(transform).__name__}, not a statehost "
            "transform. Fix: wrap it with client.pmap / client.vmap / client.jit.",
        )


def _stored_frame(payload: bytes) -> Frame:
    return decode(payload)


# -- JSON arguments ---------------------------------------------------------------
def _array(data: Any, dtype: str | None, where: str) -> np.ndarray:
    try:
        if dtype is not None:
            return np.asarray(data, dtype=np.dtype(jax.numpy.dtype(dtype)))
        raw = np.asarray(data)
    except (TypeError, ValueError) as exc:
        raise ApiError(422, "ValidationError",
                       f"{where}: an argument is not a valid array ({exc}).") from exc
    if raw.dtype.kind in "iu":
        return raw.astype(np.int32)
    if raw.dtype.kind == "f":
        return raw.astype(np.float32)
    if raw.dtype.kind == "b":
        return raw
    raise ApiError(422, "ValidationError",
                   f"{where}: an argument holds {raw.dtype} data; arrays must be numbers or "
                   "booleans (nested lists, or {\"data\": ..., \"dtype\": ...}).")


def _from_json(value: Any, where: str) -> Any:
    if isinstance(value, list):
        return _array(value, None, where)
    if isinstance(value, dict):
        if "data" in value and set(value) <= {"data", "dtype"}:
            return _array(value["data"], value.get("dtype"), where)
        return {k: _from_json(v, where) for k, v in value.items()}
    return value


# -- routes -----------------------------------------------------------------------
@router.post("/v1/functions/register", response_class=Response,
             dependencies=[Depends(require_submit)],
             summary="Register a transform under 'namespace/name' (a frame, scope submit)")
async def register(frame: FrameBody, rt: RuntimeDep, principal: PrincipalDep) -> Response:
    """Header ``{"session", "name": "ns/fname", "function": {"digest"}, "refs": [ids]}`` and
    section ``function`` (the pickled transform, as sent for a call). Every state it uses
    must be a named state of the namespace. Answers a frame with the signature."""
    header = frame.header
    rt.session(header.get("session"), _REGISTER)
    namespace, name = split_name(header.get("name"), _REGISTER)
    rt.registry.visible(principal, namespace, "submit", _REGISTER)
    spec = header.get("function")
    if not isinstance(spec, dict) or not isinstance(spec.get("digest"), str) \
            or not frame.has("function"):
        raise ApiError(400, "ProtocolError",
                       f"{_REGISTER}: header.function.digest and a function section are needed.")
    buffers = frame.section_buffers("function")
    digest = hashlib.sha256(buffers[0]).hexdigest()
    if digest != spec["digest"]:
        raise ApiError(400, "ProtocolError",
                       f"{_REGISTER}: header.function.digest {spec['digest'][:16]}... does not "
                       f"match the function section's sha256 {digest[:16]}....")
    refs = header.get("refs", [])
    if not isinstance(refs, list) or not all(isinstance(i, str) for i in refs):
        raise ApiError(400, "ProtocolError", f"{_REGISTER}: header.refs must be a list of ids.")
    for state_id in refs:
        row = rt.registry.db.state(state_id)
        if row is None or row.namespace != namespace or rt.store.by_id(state_id) is None:
            raise ApiError(
                422, "ValidationError",
                f"{_REGISTER}: state {state_id} is not a named state of namespace "
                f"{namespace!r}. A registered function may only use named states: put them "
                "first (client.put('ns/name', obj)), then register.", state=state_id,
            )
    payload = encode({}, {"function": Section(bytes(buffers[0]),
                                              [bytes(b) for b in buffers[1:]])}).to_bytes()

    def work() -> tuple[Any, set[str]]:
        loaded: set[str] = set()
        load = _loader(rt, namespace, set(refs), loaded, _REGISTER)
        transform = _unpickle(_stored_frame(payload), "function", load, _REGISTER)
        _check_transform(transform, _REGISTER)
        return transform, loaded

    transform, loaded = await rt.scheduler.run(refs, work)
    state_ids = sorted(loaded)
    signature = _signature(transform)
    rt.registry.db.put_function(FunctionRow(namespace, name, payload, digest, state_ids,
                                            signature, time.time()))
    rt.functions.put(f"fn:{namespace}:{name}:{digest}",
                     CachedFunction(transform, frozenset(state_ids)))
    return frame_response(encode({"name": f"{namespace}/{name}", "digest": digest,
                                  "state_ids": state_ids, "signature": signature}))


def _describe(rt: Any, row: FunctionRow) -> dict[str, Any]:
    names = {r.id: r.full_name for r in rt.registry.db.states(row.namespace)}
    return {"name": f"{row.namespace}/{row.name}", "digest": row.digest,
            "signature": row.signature, "states": [names.get(i, i) for i in row.state_ids],
            "created_at": row.created}


@router.get("/v1/namespaces/{namespace}/functions",
            summary="List the registered functions of a namespace with their signatures")
def list_functions(namespace: str, rt: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    rt.registry.visible(principal, namespace, "read", f"GET /v1/namespaces/{namespace}/functions")
    return {"namespace": namespace,
            "functions": [_describe(rt, r) for r in rt.registry.db.functions(namespace)]}


@router.post("/v1/namespaces/{namespace}/functions/{name}/invoke",
             summary="Run a registered function with JSON arguments (scope invoke)")
async def invoke(namespace: str, name: str, body: InvokeBody, rt: RuntimeDep,
                 principal: PrincipalDep) -> dict[str, Any]:
    """Takes the locks of the function's states, runs it and commits the states it wrote.
    Answers ``{"outputs": <pytree of nested lists>, "versions": {state name: version}}``;
    an exception in the function answers 422 RemoteExecutionError."""
    where = f"POST /v1/namespaces/{namespace}/functions/{name}/invoke"
    rt.registry.visible(principal, namespace, "invoke", where)
    row = rt.registry.db.function(namespace, name)
    if row is None:
        raise ApiError(404, "NotFound", f"{where}: no function {name!r} in {namespace!r}. "
                       f"GET /v1/namespaces/{namespace}/functions lists them.")
    args = [_from_json(a, where) for a in body.args]
    kwargs = {k: _from_json(v, where) for k, v in body.kwargs.items()}
    key = f"fn:{namespace}:{name}:{row.digest}"
    writer = types.SimpleNamespace(principal=principal)
    names = {r.id: r.full_name for r in rt.registry.db.states(namespace)}

    def work() -> tuple[Any, dict[str, int]]:
        hit = rt.functions.get(key)
        if hit is not None and all(rt.store.by_id(i) is not None for i in hit.state_ids):
            transform = hit.transform
        else:
            loaded: set[str] = set()
            load = _loader(rt, namespace, None, loaded, where)
            transform = _unpickle(_stored_frame(row.payload), "function", load, where)
            _check_transform(transform, where)
            rt.functions.put(key, CachedFunction(transform, frozenset(loaded)))
        touched = [s for s in (rt.store.by_id(i) for i in row.state_ids) if s is not None]
        before = {s.id: (s._value, s._writes) for s in touched}
        try:
            out = jax.device_get(transform(*args, **kwargs))
        except Exception as exc:
            for s in touched:
                s._value, s._writes = before[s.id]
            raise _user_error(exc, where) from exc
        written = [s.id for s in touched if s._writes != before[s.id][1]]
        rt.commit(written, writer)
        versions = {names.get(s.id, s.id): rt.store.meta(s.id).version for s in touched}
        return out, versions

    out, versions = await rt.scheduler.run(row.state_ids, work)
    return {"outputs": to_json(out), "versions": versions}
