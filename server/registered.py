"""Registered functions: a transform stored under ``namespace/name`` and invoked with JSON.

``register`` stores the function section as sent for a call (a small frame holding
the pickle and its out-of-band buffers) with the named states it uses and its
input signature; it lives in SQLite and survives restarts. ``invoke`` runs it on
those states through the one commit path (``execution.invoke``). A registered
function may use named states of its own namespace only.
"""

from __future__ import annotations

import inspect
import json
import time
from typing import TYPE_CHECKING, Any

from statehost._errors import brief
from statehost.server.callable_cache import CachedFunction, Transform, check_digest, load_transform
from statehost.server.errors import NotFoundError, ValidationError
from statehost.server.execution import InvokeResult, invoke
from statehost.server.names import split_name
from statehost.server.persistence import FunctionRow
from statehost.server.placement import global_arguments
from statehost.wire import RegisterReply, RegisterRequest, StateRef, decode, encode

if TYPE_CHECKING:
    from statehost.server.calls import Call
    from statehost.server.runtime import Runtime

__all__ = ["invoke_registered", "register", "signature"]

_REGISTER = "POST /v1/functions/register"
_MSG_NOT_NAMED = (
    "{where}: the function uses state {label!r} (id {id}), which is not a named state of "
    "namespace {namespace!r}. A registered function may only use named states: put them "
    "first (client.put('ns/name', obj)), then register."
)


def _plain(value: Any) -> Any:
    """``value`` if it is JSON, else a bounded repr (``brief``: the sender's ``__repr__`` may
    raise, or recurse)."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError, RecursionError):
        return brief(value)


def signature(transform: Transform) -> dict[str, Any]:
    """The transform's kind, function name, parameters and axes, as JSON."""
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


def _named_loader(rt: Runtime, namespace: str, allowed: set[str] | None, loaded: set[str],
                  where: str) -> Any:
    """``persistent_load`` that hands out the resident named states of ``namespace`` only."""

    def load(ref: StateRef) -> Any:
        meta, state = rt.store.meta(ref.id), rt.store.by_id(ref.id)
        if (allowed is not None and ref.id not in allowed) or meta is None or state is None \
                or meta.namespace != namespace:
            raise ValidationError(_MSG_NOT_NAMED.format(
                where=where, label=ref.name or ref.id[:8], id=ref.id, namespace=namespace),
                state=ref.id)
        loaded.add(ref.id)
        return state

    return load


def _load(rt: Runtime, payload: bytes, namespace: str, allowed: set[str] | None,
          where: str) -> tuple[Transform, set[str]]:
    loaded: set[str] = set()
    section = decode(payload).sections["function"]
    transform = load_transform(section, _named_loader(rt, namespace, allowed, loaded, where),
                               where)
    return transform, loaded


def register(call: Call, request: RegisterRequest, rt: Runtime) -> RegisterReply:
    """Checks and stores the transform; every state it uses must be named in its namespace."""
    namespace, name = split_name(request.name, _REGISTER)
    rt.registry.visible(call.session, namespace, "submit", _REGISTER)
    check_digest(request.function, request.digest, _REGISTER)
    for state_id in request.refs:
        row = rt.registry.db.state(state_id)
        if row is None or row.namespace != namespace or rt.store.by_id(state_id) is None:
            raise ValidationError(_MSG_NOT_NAMED.format(
                where=_REGISTER, label=state_id[:8], id=state_id, namespace=namespace),
                state=state_id)
    rt.share(call, request, _REGISTER)  # a group's followers store it too (server/cluster.py)
    function = request.function
    payload = encode({}, {"function": type(function)(
        bytes(function.payload), [memoryview(bytes(b)) for b in function.buffers])}).to_bytes()
    transform, loaded = _load(rt, payload, namespace, set(request.refs), _REGISTER)
    state_ids = sorted(loaded)
    sig = signature(transform)
    rt.registry.db.put_function(FunctionRow(namespace, name, payload, request.digest,
                                            state_ids, sig, time.time()))
    rt.functions.put(f"fn:{namespace}:{name}:{request.digest}",
                     CachedFunction(transform, frozenset(state_ids)))
    return RegisterReply(name=f"{namespace}/{name}", digest=request.digest,
                         state_ids=tuple(state_ids), signature=sig)


def find(rt: Runtime, namespace: str, name: str, where: str) -> FunctionRow:
    row = rt.registry.db.function(namespace, name)
    if row is None:
        raise NotFoundError(f"{where}: no function {name!r} in {namespace!r}. "
                            f"GET /v1/namespaces/{namespace}/functions lists them.")
    return row


def invoke_registered(call: Call, row: FunctionRow, args: list[Any], kwargs: dict[str, Any],
                      rt: Runtime, where: str) -> InvokeResult:
    """Runs the stored transform (from the cache, or unpickled again) on its named states.
    In a group every process runs it (the arguments are JSON, broadcast once); its
    one-request session goes with it (no ``open`` announced it)."""
    assert call.session is not None
    rt.share(call, None, where, namespace=row.namespace, name=row.name, args=args,
             kwargs=kwargs, principal=call.session.principal, client=call.session.client)
    key = f"fn:{row.namespace}:{row.name}:{row.digest}"
    hit = rt.functions.get(key)
    if hit is not None and all(rt.store.by_id(i) is not None for i in hit.state_ids):
        transform = hit.transform
    else:
        transform, loaded = _load(rt, row.payload, row.namespace, None, where)
        rt.functions.put(key, CachedFunction(transform, frozenset(loaded)))
    args, kwargs = global_arguments((args, kwargs))  # each process's copy, one global array
    return invoke(call, transform, args, kwargs, rt, where)
