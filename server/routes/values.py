"""The JSON API of named states: metadata, and values as JSON or ``.npy`` (no pickles).

A value is served for a state whose value is a single array (one leaf); a
state holding a pytree of several arrays answers 422 here (use the Python
client's ``client.get``). Arrays larger than ``json_max_elements`` are only
sent as ``.npy`` (``Accept: application/x-npy``). Every value answer carries
the state's version in ``ETag`` and ``X-Statehost-Version``; a ``PUT`` takes
``If-Match: <version>`` to refuse lost updates.
"""

from __future__ import annotations

import io
import math
from typing import Any

import jax
import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from pydantic import ValidationError as PydanticValidationError

from statehost.server.calls import Call
from statehost.server.deps import PrincipalDep, RequestSessionDep, RuntimeDep, require_token
from statehost.server.errors import (
    NotFoundError,
    PayloadTooLargeError,
    PreconditionFailedError,
    ProtocolError,
    StateDamagedError,
    StorageError,
    ValidationError,
)
from statehost.server.execution import to_host
from statehost.server.openapi import BINARY, errors
from statehost.server.persistence import StateRow
from statehost.server.staging import Transaction
from statehost.server.store import Session

__all__ = ["NPY", "ValueBody", "read_body", "router", "to_json"]

NPY = "application/x-npy"
_STREAM_ABOVE = 1 << 20

router = APIRouter(prefix="/v1/namespaces", tags=["json"], dependencies=[Depends(require_token)])


class ValueBody(BaseModel):
    """A new value for a state: nested lists, and optionally the dtype they are meant as."""

    data: Any = Field(description="the array as nested lists (a number for a 0-d array)")
    dtype: str | None = Field(None, description="e.g. 'float32'; default: the state's dtype")


# -- helpers ----------------------------------------------------------------------
def _find(rt: Any, principal: Any, namespace: str, name: str, scope: str,
          where: str) -> StateRow:
    rt.registry.visible(principal, namespace, scope, where)
    for row in rt.registry.db.states(namespace):
        if row.full_name == name:
            return row
    raise NotFoundError(f"{where}: no state {name!r} in namespace {namespace!r}. "
                   f"GET /v1/namespaces/{namespace}/states lists them.")


def _resident(rt: Any, row: StateRow, where: str) -> Any:
    state = rt.store.by_id(row.id)
    if state is None:
        why = rt.persistence.damaged.get(row.id, "it is not loaded")
        raise StateDamagedError(f"{where}: state {row.full_name!r} is not available ({why}).")
    return state


def _leaf(state: Any, row: StateRow, where: str) -> Any:
    leaves = jax.tree_util.tree_leaves(state.value)
    if len(leaves) != 1:
        raise ValidationError(
            f"{where}: state {row.full_name!r} holds a pytree of {len(leaves)} arrays; the JSON "
            "value API reads and writes states whose value is a single array. Fix: use the "
            "Python client (client.get) for this state.",
        )
    return leaves[0]


def _clean(x: Any) -> Any:
    """NaN and infinities become the strings JSON has no numbers for."""
    if isinstance(x, list):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, complex):
        return [_clean(x.real), _clean(x.imag)]
    return x


def to_json(tree: Any) -> Any:
    """Host values (numpy arrays, scalars, tuples, dicts) as JSON-able Python objects."""
    if isinstance(tree, dict):
        return {str(k): to_json(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [to_json(v) for v in tree]
    if isinstance(tree, np.ndarray | np.generic):
        return _clean(np.asarray(tree).tolist())
    if hasattr(tree, "__array__") and hasattr(tree, "dtype"):
        return _clean(np.asarray(tree).tolist())
    if tree is None or isinstance(tree, bool | int | str):
        return tree
    if isinstance(tree, float | complex):
        return _clean(tree)
    return repr(tree)


def _etag(version: int) -> dict[str, str]:
    return {"ETag": f'"{version}"', "X-Statehost-Version": str(version)}


def _wants_npy(request: Request) -> bool:
    return NPY in request.headers.get("accept", "")


async def read_body(request: Request, limit: int, where: str) -> bytes:
    """The whole body, refused with 413 once it passes ``limit`` bytes."""
    too_big = PayloadTooLargeError(
        f"{where}: the body is larger than this server's limit of {limit} bytes (max_body). "
        "Fix: send less, or start the server with a larger --max-body.", limit=limit,
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def _parse_dtype(text: str, where: str) -> np.dtype:
    try:
        return np.dtype(jax.numpy.dtype(text))
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            f"{where}: {text!r} is not a dtype (e.g. 'float32', 'int32').") from exc


def _if_match(request: Request) -> int | None:
    raw = request.headers.get("if-match")
    if raw is None or raw.strip() == "*":
        return None
    text = raw.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise ProtocolError(f"If-Match must be a state version (an integer), got {raw!r}.")
    return int(text)


def _new_value(body: bytes, ctype: str, expected: Any, where: str) -> np.ndarray:
    """The uploaded array, checked against the current value's shape and dtype."""
    want_dtype, want_shape = np.dtype(expected.dtype), tuple(expected.shape)
    if ctype == NPY:
        try:
            array = np.lib.format.read_array(io.BytesIO(body), allow_pickle=False)
        except Exception as exc:
            raise ProtocolError(f"{where}: the body is not a valid .npy file ({exc}).") from exc
        if array.dtype != want_dtype:
            raise ValidationError(
                f"{where}: dtype mismatch: expected {want_dtype}, got {array.dtype}.",
                           expected={"dtype": str(want_dtype)}, got={"dtype": str(array.dtype)})
    else:
        try:
            parsed = ValueBody.model_validate_json(body)
        except PydanticValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                 for e in exc.errors())
            raise ValidationError(f"{where}: invalid body ({problems}); send JSON "
                           '{"data": nested lists, "dtype"?: str} or a .npy file with '
                           f"Content-Type {NPY}.") from exc
        if parsed.dtype is not None and _parse_dtype(parsed.dtype, where) != want_dtype:
            raise ValidationError(
                f"{where}: dtype mismatch: expected {want_dtype}, got {parsed.dtype}.",
                           expected={"dtype": str(want_dtype)}, got={"dtype": parsed.dtype})
        try:
            raw = np.asarray(parsed.data)
        except ValueError as exc:
            raise ValidationError(f"{where}: data is not a rectangular array ({exc}).") from exc
        if raw.dtype.kind not in "biuf" or not np.can_cast(raw.dtype, want_dtype, "same_kind"):
            raise ValidationError(f"{where}: dtype mismatch: expected {want_dtype}, got data of "
                           f"{raw.dtype}.", expected={"dtype": str(want_dtype)},
                           got={"dtype": str(raw.dtype)})
        array = raw.astype(want_dtype)
    if tuple(array.shape) != want_shape:
        raise ValidationError(f"{where}: shape mismatch: expected {list(want_shape)}, got "
                       f"{list(array.shape)}.", expected={"shape": list(want_shape)},
                       got={"shape": list(array.shape)})
    return array


def _npy_response(array: np.ndarray, headers: dict[str, str]) -> Response:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    data = buf.getbuffer()
    if data.nbytes <= _STREAM_ABOVE:
        return Response(bytes(data), media_type=NPY, headers=headers)

    def chunks() -> Any:
        for pos in range(0, data.nbytes, 4 << 20):
            yield bytes(data[pos:pos + (4 << 20)])

    return StreamingResponse(chunks(), media_type=NPY,
                             headers={**headers, "content-length": str(data.nbytes)})


# -- the work (a server group's followers run it too: server/follower.py) ------------
def read_value(state: Any, where: str) -> np.ndarray:
    """The value of a single-array state, on the host."""
    (leaf,) = jax.tree_util.tree_leaves(state.value)
    return np.asarray(to_host(leaf, where))


def write_value(call: Call, state: Any, array: np.ndarray, rt: Any, where: str) -> int:
    """Commits ``array`` as the value of a single-array state, laid out as the old one;
    returns the new version."""
    (old,) = jax.tree_util.tree_leaves(state.value)
    sharding = getattr(old, "sharding", None)
    value = jax.device_put(array, sharding) if sharding is not None else jax.device_put(array)
    tx = Transaction(rt, call.session, where)
    tx.replace(state, jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(state.value), [value]))
    return tx.commit().versions[state.id]


# -- routes -----------------------------------------------------------------------
@router.get("/{namespace}/states", summary="List the named states of a namespace (metadata)",
            responses=errors(NotFoundError, ValidationError))
def list_states(namespace: str, rt: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """Shapes, dtypes, bytes, version, last writer and status of every named state."""
    where = f"GET /v1/namespaces/{namespace}/states"
    rt.registry.visible(principal, namespace, "read", where)
    return {"namespace": namespace,
            "states": [rt.registry.describe(r) for r in rt.registry.db.states(namespace)]}


@router.get("/{namespace}/states/{name}", summary="Metadata of one named state",
            responses=errors(NotFoundError, ValidationError))
def state_info(namespace: str, name: str, rt: RuntimeDep,
               principal: PrincipalDep) -> dict[str, Any]:
    """``name`` is ``object`` for a State put on its own, else ``object.path``."""
    where = f"GET /v1/namespaces/{namespace}/states/{name}"
    return rt.registry.describe(_find(rt, principal, namespace, name, "read", where))


@router.get(
    "/{namespace}/states/{name}/value",
    summary="A state's value as JSON nested lists, or .npy with Accept: application/x-npy",
    responses={200: {"content": {"application/json": {}, NPY: {"schema": BINARY}}},
               **errors(NotFoundError, StateDamagedError, PayloadTooLargeError, ValidationError)},
)
async def get_value(namespace: str, name: str, request: Request, rt: RuntimeDep,
                    principal: PrincipalDep) -> Response:
    """JSON ``{"name", "version", "dtype", "shape", "data"}`` for arrays of at most
    ``json_max_elements`` elements (413 above: ask for ``.npy``); states holding a pytree of
    several arrays answer 422. The version is in ``ETag`` and ``X-Statehost-Version``."""
    where = f"GET /v1/namespaces/{namespace}/states/{name}/value"
    row = await run_in_threadpool(_find, rt, principal, namespace, name, "read", where)
    state = _resident(rt, row, where)
    leaf = _leaf(state, row, where)
    npy = _wants_npy(request)
    limit = rt.settings.json_max_elements
    if not npy and int(np.prod(leaf.shape)) > limit:
        raise PayloadTooLargeError(
            f"{where}: the value has {int(np.prod(leaf.shape))} elements, more than this "
            f"server sends as JSON ({limit}, json_max_elements). Fix: send "
            f"'Accept: {NPY}' to get it as a .npy file.", limit=limit,
        )

    def work(call: Call) -> tuple[int, np.ndarray]:
        rt.share(call, None, where, state=row.id)  # a group's followers read it too
        return rt.store.meta(row.id).version, read_value(state, where)

    version, array = await rt.submit(
        Call("read", Session.for_request(principal), (row.id,), work), where)
    headers = _etag(version)
    if npy:
        return _npy_response(array, headers)
    return JSONResponse({"name": row.full_name, "version": version, "dtype": str(array.dtype),
                         "shape": list(array.shape), "data": to_json(array)}, headers=headers)


@router.put(
    "/{namespace}/states/{name}/value",
    summary="Write a state's value (JSON or .npy); If-Match: <version> refuses lost updates",
    responses=errors(NotFoundError, StateDamagedError, ProtocolError, PreconditionFailedError,
                     PayloadTooLargeError, ValidationError, StorageError),
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": ValueBody.model_json_schema()},
        NPY: {"schema": BINARY},
    }}, "parameters": [{
        "name": "If-Match", "in": "header", "required": False,
        "description": "write only if the state is still at this version (412 otherwise)",
        "schema": {"type": "string", "pattern": r'^\s*(\*|(W/)?"?[0-9]+"?)\s*$'},
    }]},
)
async def put_value(namespace: str, name: str, request: Request, rt: RuntimeDep,
                    principal: PrincipalDep, session: RequestSessionDep) -> JSONResponse:
    """The new value must have the current value's shape and dtype (422 otherwise). With
    ``If-Match`` the write happens only if the state is still at that version (412
    otherwise). The write is a commit: it returns the new version. Scope ``invoke``."""
    where = f"PUT /v1/namespaces/{namespace}/states/{name}/value"
    row = await run_in_threadpool(_find, rt, principal, namespace, name, "invoke", where)
    state = _resident(rt, row, where)
    expected = _if_match(request)
    body = await read_body(request, rt.settings.max_body, where)
    ctype = request.headers.get("content-type", "").split(";")[0].strip()
    array = _new_value(body, ctype, _leaf(state, row, where), where)

    def work(call: Call) -> int:
        version = rt.store.meta(row.id).version
        if expected is not None and expected != version:
            raise PreconditionFailedError(
                f"{where}: If-Match version {expected} is not the current version {version}; "
                "nothing was written. Fix: read the value again and retry with its version.",
                expected_version=expected, current_version=version,
            )
        assert call.session is not None
        rt.share(call, None, where, state=row.id, array=array,
                 principal=call.session.principal, client=call.session.client)
        return write_value(call, state, array, rt, where)

    version = await rt.submit(Call("write", session, (row.id,), work), where)
    return JSONResponse({"name": row.full_name, "version": version}, headers=_etag(version))
