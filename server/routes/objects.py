"""Named objects: ``put`` / ``get`` (frames, they carry pickles) and list / info / delete /
checkpoint (JSON)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Response

from statehost._wire import Section, encode, pack
from statehost.server.deps import FrameBody, PrincipalDep, RuntimeDep, require_submit, require_token
from statehost.server.engine import push_states
from statehost.server.errors import ApiError
from statehost.server.named import split_name
from statehost.server.persistence import Durability, flush_ids
from statehost.server.routes._frames import frame_response

frames = APIRouter(
    prefix="/v1/objects", tags=["objects"],
    dependencies=[Depends(require_token), Depends(require_submit)],
)
router = APIRouter(prefix="/v1/namespaces", tags=["objects"], dependencies=[Depends(require_token)])


@frames.post("/put", response_class=Response)
async def put(frame: FrameBody, rt: RuntimeDep) -> Response:
    header = frame.header
    session = rt.session(header.get("session"), "POST /v1/objects/put")
    paths = header.get("paths")
    if not isinstance(paths, dict) or not frame.has("structure"):
        raise ApiError(400, "ProtocolError",
                       "POST /v1/objects/put: header.paths and a structure section are needed.")
    split_name(header.get("name"), "POST /v1/objects/put")
    structure = bytes(frame.section_buffers("structure")[0])
    rt.metrics.wire_bytes.labels("in", "state").inc(frame.section_nbytes("states"))

    def work() -> dict[str, Any]:
        if frame.has("states"):
            push_states(frame, session, rt)
        return rt.registry.put(session, header["name"], str(header.get("kind", "object")),
                               structure, {str(k): str(v) for k, v in paths.items()})

    result = await rt.scheduler.run(list(paths), work)
    rt.refresh_gauges()
    return frame_response(encode({"state_versions": result["states"]}))


@frames.post("/get", response_class=Response)
async def get(frame: FrameBody, rt: RuntimeDep) -> Response:
    header = frame.header
    session = rt.session(header.get("session"), "POST /v1/objects/get")
    obj, rows = rt.registry.get(session, header.get("name"))
    missing = [r.full_name for r in rows if rt.store.by_id(r.id) is None]
    if missing:
        raise ApiError(409, "StateDamagedError",
                       f"POST /v1/objects/get: {header.get('name')!r} has states that could not "
                       f"be loaded: {', '.join(missing)}. GET /v1/namespaces/{obj.namespace}/"
                       f"objects/{obj.name} shows why.")
    ids = [r.id for r in rows]

    def work() -> Any:
        import jax

        versions = {i: rt.store.meta(i).version for i in ids}
        sections = {"structure": Section(obj.structure)}
        if header.get("pull", True):
            values = jax.device_get([(i, rt.store.by_id(i)._value) for i in ids])
            sections["states"] = pack(values, refs=False, code=False)
        return encode({"kind": obj.kind, "state_versions": versions}, sections)

    reply = await rt.scheduler.run(ids, work)
    rt.metrics.wire_bytes.labels("out", "state").inc(reply.nbytes)
    return frame_response(reply)


def _visible(rt: Any, principal: Any, namespace: str, scope: str, where: str) -> None:
    rt.registry.visible(principal, namespace, scope, where)


@router.get("/{namespace}/objects")
def list_objects(namespace: str, rt: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    _visible(rt, principal, namespace, "read", f"GET /v1/namespaces/{namespace}/objects")
    rows = rt.registry.db.states(namespace)
    return {"namespace": namespace, "objects": [
        {"name": o.name, "kind": o.kind, "updated_at": o.updated,
         "states": [rt.registry.describe(r) for r in rows if r.object == o.name]}
        for o in rt.registry.db.objects(namespace)]}


@router.get("/{namespace}/objects/{name}")
def object_info(namespace: str, name: str, rt: RuntimeDep,
                principal: PrincipalDep) -> dict[str, Any]:
    where = f"GET /v1/namespaces/{namespace}/objects/{name}"
    _visible(rt, principal, namespace, "read", where)
    obj = rt.registry.db.get_object(namespace, name)
    if obj is None:
        raise ApiError(404, "NotFound", f"{where}: no object {name!r} in {namespace!r}.")
    rows = [r for r in rt.registry.db.states(namespace) if r.object == name]
    return {"name": f"{namespace}/{name}", "kind": obj.kind, "created_at": obj.created,
            "updated_at": obj.updated, "durability": rt.persistence.durability(namespace),
            "states": [rt.registry.describe(r) for r in rows]}


@router.delete("/{namespace}/objects/{name}", status_code=204)
async def delete_object(namespace: str, name: str, rt: RuntimeDep,
                        principal: PrincipalDep) -> Response:
    where = f"DELETE /v1/namespaces/{namespace}/objects/{name}"
    _visible(rt, principal, namespace, "submit", where)
    obj = rt.registry.db.get_object(namespace, name)
    if obj is None:
        raise ApiError(404, "NotFound", f"{where}: no object {name!r} in {namespace!r}.")
    await rt.scheduler.run(obj.state_ids, rt.registry.delete, namespace, name)
    rt.functions.evict_states(obj.state_ids)
    rt.refresh_gauges()
    return Response(status_code=204)


@router.post("/{namespace}/checkpoint")
async def checkpoint(namespace: str, rt: RuntimeDep, principal: PrincipalDep,
                     name: str | None = None) -> dict[str, Any]:
    where = f"POST /v1/namespaces/{namespace}/checkpoint"
    _visible(rt, principal, namespace, "invoke", where)
    ids = [r.id for r in rt.registry.db.states(namespace) if name is None or r.object == name]
    written = await flush_ids(rt, ids)
    return {"namespace": namespace, "name": name, "flushed": written}


@router.put("/{namespace}")
def set_namespace(namespace: str, body: dict[str, str], rt: RuntimeDep,
                  principal: PrincipalDep) -> dict[str, str]:
    where = f"PUT /v1/namespaces/{namespace}"
    _visible(rt, principal, namespace, "admin", where)
    durability = body.get("durability")
    if not Durability.is_valid(durability):
        raise ApiError(422, "ValidationError", f"{where}: durability must be one of "
                       f"{Durability.choices()}; got {durability!r}.")
    rt.persistence.set_durability(namespace, durability)
    return {"namespace": namespace, "durability": durability}
