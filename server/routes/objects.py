"""Named objects: ``put`` / ``get`` (frames: they carry pickles) and list / info / delete /
checkpoint (JSON)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool

from statehost.server.calls import Call
from statehost.server.deps import FrameBody, PrincipalDep, RuntimeDep, require_submit, require_token
from statehost.server.errors import (
    NameConflictError,
    NotFoundError,
    PayloadError,
    PayloadTooLargeError,
    ProtocolError,
    SessionNotFoundError,
    StateConflictError,
    StateDamagedError,
    StateNotFoundError,
    StorageError,
    ValidationError,
)
from statehost.server.named import delete_named, get_object, put_object
from statehost.server.names import check_name
from statehost.server.openapi import errors
from statehost.server.openapi import frames as frame_route
from statehost.server.persistence import flush_ids
from statehost.server.routes._frames import frame_response, stream_nbytes
from statehost.server.store import Session
from statehost.wire import GetReply, GetRequest, PutReply, PutRequest

frames = APIRouter(
    prefix="/v1/objects", tags=["objects"],
    dependencies=[Depends(require_token), Depends(require_submit)],
)
router = APIRouter(prefix="/v1/namespaces", tags=["objects"], dependencies=[Depends(require_token)])


@frames.post("/put", response_class=Response,
             summary="Name an object and its states: client.put (a frame, scope submit)",
             **frame_route(
    PutRequest, PutReply, SessionNotFoundError, NotFoundError, StateNotFoundError, ProtocolError,
    PayloadError, StateConflictError, NameConflictError, ValidationError, PayloadTooLargeError,
    StorageError))
async def put(frame: FrameBody, rt: RuntimeDep, principal: PrincipalDep) -> Response:
    message = PutRequest.from_frame(frame)
    session = rt.session(message.session, principal, "POST /v1/objects/put")
    rt.metrics.wire_bytes.labels("in", "state").inc(frame.section_nbytes("states"))
    keys = (*message.paths, *message.uploads)
    reply = await rt.submit(
        Call("put", session, keys, lambda c: put_object(c, message, rt)), "POST /v1/objects/put")
    await run_in_threadpool(rt.refresh_gauges)
    return frame_response(reply)


@frames.post("/get", response_class=Response,
             summary="A named object with its states: client.get (a frame, scope submit)",
             **frame_route(
    GetRequest, GetReply, SessionNotFoundError, NotFoundError, StateDamagedError, ValidationError))
async def get(frame: FrameBody, rt: RuntimeDep, principal: PrincipalDep) -> Response:
    message = GetRequest.from_frame(frame)
    where = "POST /v1/objects/get"
    session = rt.session(message.session, principal, where)
    obj, rows = await run_in_threadpool(rt.registry.get, session, message.name)
    missing = [r.full_name for r in rows if rt.store.by_id(r.id) is None]
    if missing:
        raise StateDamagedError(
            f"{where}: {message.name!r} has states that could not be loaded: "
            f"{', '.join(missing)}. GET /v1/namespaces/{obj.namespace}/objects/{obj.name} "
            "shows why.")
    reply = await rt.submit(
        Call("get", session, tuple(r.id for r in rows),
             lambda c: get_object(c, obj, message.pull, rt)), where)
    encoded = reply.to_frame()
    rt.metrics.wire_bytes.labels("out", "state").inc(stream_nbytes(encoded))
    return frame_response(encoded)


def _object(rt: Any, principal: Any, namespace: str, name: str, scope: str, where: str) -> Any:
    check_name(name, "object", where)
    rt.registry.visible(principal, namespace, scope, where)
    obj = rt.registry.db.get_object(namespace, name)
    if obj is None:
        raise NotFoundError(f"{where}: no object {name!r} in {namespace!r}.")
    return obj


@router.get("/{namespace}/objects", summary="The named objects of a namespace",
            responses=errors(NotFoundError, ValidationError))
def list_objects(namespace: str, rt: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    where = f"GET /v1/namespaces/{namespace}/objects"
    rt.registry.visible(principal, namespace, "read", where)
    rows = rt.registry.db.states(namespace)
    return {"namespace": namespace, "objects": [
        {"name": o.name, "kind": o.kind, "updated_at": o.updated,
         "states": [rt.registry.describe(r) for r in rows if r.object == o.name]}
        for o in rt.registry.db.objects(namespace)]}


@router.get("/{namespace}/objects/{name}", summary="A named object's metadata and states",
         responses=errors(NotFoundError, ValidationError))
def object_info(namespace: str, name: str, rt: RuntimeDep,
                principal: PrincipalDep) -> dict[str, Any]:
    where = f"GET /v1/namespaces/{namespace}/objects/{name}"
    obj = _object(rt, principal, namespace, name, "read", where)
    rows = [r for r in rt.registry.db.states(namespace) if r.object == name]
    return {"name": f"{namespace}/{name}", "kind": obj.kind, "created_at": obj.created,
            "updated_at": obj.updated, "durability": rt.persistence.durability(namespace),
            "states": [rt.registry.describe(r) for r in rows]}


@router.delete("/{namespace}/objects/{name}",
               summary="Delete a named object and its states; answers the deleted state ids",
               responses=errors(NotFoundError, ValidationError))
async def delete_object(namespace: str, name: str, rt: RuntimeDep,
                        principal: PrincipalDep) -> dict[str, Any]:
    """Answers ``{"name": "ns/name", "deleted": [state ids]}``: a client that holds those
    states forgets the server's copy, so its next put or call uploads them again (the ids
    come from the delete itself, so a concurrent put cannot make them stale). Scope
    ``submit``."""
    where = f"DELETE /v1/namespaces/{namespace}/objects/{name}"
    obj = await run_in_threadpool(_object, rt, principal, namespace, name, "submit", where)
    # Not checked against max_queued: deleting is how a namespace frees room.
    deleted = await rt.scheduler.submit(Call(
        "delete", Session.for_request(principal), obj.state_ids,
        lambda c: delete_named(c, namespace, name, rt)))
    rt.functions.evict_states(obj.state_ids)
    await run_in_threadpool(rt.refresh_gauges)
    return {"name": f"{namespace}/{name}", "deleted": list(deleted)}


@router.post("/{namespace}/checkpoint",
             summary="Write a namespace's (or one object's) named states to disk now",
             responses=errors(NotFoundError, ValidationError, StorageError))
async def checkpoint(namespace: str, rt: RuntimeDep, principal: PrincipalDep,
                     name: str | None = None) -> dict[str, Any]:
    where = f"POST /v1/namespaces/{namespace}/checkpoint"
    if name is not None:
        check_name(name, "object", where)
    rt.registry.visible(principal, namespace, "invoke", where)
    rows = await run_in_threadpool(rt.registry.db.states, namespace)
    ids = [r.id for r in rows if name is None or r.object == name]
    written = await flush_ids(rt, ids)
    return {"namespace": namespace, "name": name, "flushed": written}
