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

from typing import Any

import jax
import numpy as np
from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from statehost.server.calls import Call
from statehost.server.deps import (
    FrameBody,
    PrincipalDep,
    RequestSessionDep,
    RuntimeDep,
    require_submit,
    require_token,
)
from statehost.server.errors import (
    NotFoundError,
    PayloadError,
    ProtocolError,
    RemoteExecutionError,
    SessionNotFoundError,
    StorageError,
    ValidationError,
)
from statehost.server.names import check_name
from statehost.server.openapi import errors, frames
from statehost.server.persistence import FunctionRow
from statehost.server.registered import find, invoke_registered, register
from statehost.server.routes._frames import frame_response
from statehost.server.routes.values import to_json
from statehost.wire import RegisterReply, RegisterRequest

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


# -- JSON arguments ---------------------------------------------------------------
def _array(data: Any, dtype: str | None, where: str) -> np.ndarray:
    try:
        if dtype is not None:
            return np.asarray(data, dtype=np.dtype(jax.numpy.dtype(dtype)))
        raw = np.asarray(data)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"{where}: an argument is not a valid array ({exc}).") from exc
    if raw.dtype.kind in "iu":
        return raw.astype(np.int32)
    if raw.dtype.kind == "f":
        return raw.astype(np.float32)
    if raw.dtype.kind == "b":
        return raw
    raise ValidationError(f"{where}: an argument holds {raw.dtype} data; arrays must be numbers or "
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
             summary="Register a transform under 'namespace/name' (a frame, scope submit)",
             **frames(RegisterRequest, RegisterReply, SessionNotFoundError, NotFoundError,
                      ProtocolError, PayloadError, ValidationError))
async def register_function(frame: FrameBody, rt: RuntimeDep, principal: PrincipalDep
                            ) -> Response:
    """Header ``{"session", "name": "ns/fname", "digest", "refs": [ids]}`` and section
    ``function`` (the pickled transform, as sent for a call). Every state it uses must be a
    named state of the namespace. Answers a frame with the signature."""
    message = RegisterRequest.from_frame(frame)
    session = rt.session(message.session, principal, _REGISTER)
    reply = await rt.submit(
        Call("register", session, message.refs, lambda c: register(c, message, rt)), _REGISTER)
    return frame_response(reply)


def _describe(rt: Any, row: FunctionRow) -> dict[str, Any]:
    names = {r.id: r.full_name for r in rt.registry.db.states(row.namespace)}
    return {"name": f"{row.namespace}/{row.name}", "digest": row.digest,
            "signature": row.signature, "states": [names.get(i, i) for i in row.state_ids],
            "created_at": row.created}


@router.get("/v1/namespaces/{namespace}/functions",
            summary="List the registered functions of a namespace with their signatures",
            responses=errors(NotFoundError, ValidationError))
def list_functions(namespace: str, rt: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    where = f"GET /v1/namespaces/{namespace}/functions"
    rt.registry.visible(principal, namespace, "read", where)
    return {"namespace": namespace,
            "functions": [_describe(rt, r) for r in rt.registry.db.functions(namespace)]}


def _lookup(rt: Any, principal: Any, namespace: str, name: str, where: str
            ) -> tuple[FunctionRow, dict[str, str]]:
    check_name(name, "function", where)
    rt.registry.visible(principal, namespace, "invoke", where)
    row = find(rt, namespace, name, where)
    return row, {r.id: r.full_name for r in rt.registry.db.states(namespace)}


@router.post("/v1/namespaces/{namespace}/functions/{name}/invoke",
             summary="Run a registered function with JSON arguments (scope invoke)",
             responses=errors(NotFoundError, ValidationError, RemoteExecutionError, StorageError))
async def invoke(namespace: str, name: str, body: InvokeBody, rt: RuntimeDep,
                 principal: PrincipalDep, session: RequestSessionDep) -> dict[str, Any]:
    """Takes the locks of the function's states, runs it and commits the states it wrote.
    Answers ``{"outputs": <pytree of nested lists>, "versions": {state name: version}}``;
    an exception in the function answers 422 RemoteExecutionError."""
    where = f"POST /v1/namespaces/{namespace}/functions/{name}/invoke"
    row, names = await run_in_threadpool(_lookup, rt, principal, namespace, name, where)
    args = [_from_json(a, where) for a in body.args]
    kwargs = {k: _from_json(v, where) for k, v in body.kwargs.items()}
    result = await rt.submit(
        Call("invoke", session, row.state_ids,
             lambda c: invoke_registered(c, row, args, kwargs, rt, where)), where)
    return {"outputs": to_json(result.outputs),
            "versions": {names.get(i, i): v for i, v in result.versions.items()}}
