"""Named objects: put under ``namespace/name``, read back, described, deleted.

``put`` moves a client's states into a namespace and records the object's
structure (a pickle whose states are references); ``get`` sends both back.
Making them durable (state files, durability, reload) is ``persistence/``'s job.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import cloudpickle
import jax
import numpy as np

from statehost import State
from statehost.server.errors import (
    ForbiddenError,
    NameConflictError,
    NotFoundError,
    ProtocolError,
    StateNotFoundError,
)
from statehost.server.execution import to_host
from statehost.server.ledger import PerDevice, add
from statehost.server.names import check_name, split_name
from statehost.server.persistence import Database, ObjectRow, Persistence, StateRow, state_file
from statehost.server.persistence.files import describe_sharding
from statehost.server.quotas import Charge
from statehost.server.store import Meta, Session, StateStore, state_nbytes
from statehost.server.transfer import push_states
from statehost.wire import GetReply, PushRequest, PutReply, PutRequest, Section, StateValue, pack

__all__ = ["Registry", "delete_named", "get_object", "put_object", "split_name"]

log = logging.getLogger("statehost.server")

def _leaves(value: Any) -> list[dict[str, Any]]:
    return [{"shape": list(np.shape(x)), "dtype": str(np.asarray(x).dtype)
             if not hasattr(x, "dtype") else str(x.dtype)}
            for x in jax.tree_util.tree_leaves(value)]


class Registry:
    """Named objects and states of one server; ``persistence`` keeps them on disk."""

    def __init__(self, store: StateStore, persistence: Persistence):
        self.store = store
        self.persistence = persistence

    @property
    def db(self) -> Database:
        return self.persistence.db

    # -- access -------------------------------------------------------------------
    def visible(self, session_or_principal: Any, namespace: str, scope: str, where: str) -> None:
        """A 422 for a name that is not one (``names.check_name``), a 404 for a namespace the
        caller cannot read (never 403: names stay hidden), a 403 for a missing scope."""
        check_name(namespace, "namespace", where)
        principal = getattr(session_or_principal, "principal", session_or_principal)
        if not principal.can(namespace, "read"):
            raise NotFoundError(f"{where}: no namespace {namespace!r} visible to this token.")
        if not principal.can(namespace, scope):
            raise ForbiddenError(
                f"{where}: this token may only {principal.scope} in {namespace!r}; "
                f"this needs scope {scope!r}. Fix: use a token with that scope.")

    # -- put / get ----------------------------------------------------------------
    def put(self, session: Session, full: str, kind: str, structure: bytes,
            paths: dict[str, str]) -> dict[str, Any]:
        """Names the (already uploaded) states of an object and stores its structure."""
        where = "POST /v1/objects/put"
        namespace, name = split_name(full, where)
        self.visible(session, namespace, "submit", where)
        states = {}
        for state_id in paths:
            state = self.store.get(state_id, session)
            if state is None:
                raise StateNotFoundError(
                    f"{where}: state {state_id} of {full!r} is not on the server. Fix: put "
                    "again: client.put uploads every state the server lacks.",
                    missing=[state_id])
            row = self.db.state(state_id)
            if row is not None and (row.namespace, row.object) != (namespace, name):
                raise NameConflictError(
                    f"{where}: state {row.full_name!r} already belongs to "
                    f"'{row.namespace}/{row.object}'; one state cannot live under two names. "
                    f"Fix: put a copy (copy.deepcopy(obj) gives new states), or "
                    f"client.delete('{row.namespace}/{row.object}') first.",
                )
            states[state_id] = state
        self.persistence.durability(namespace)
        now = time.time()
        rows = []
        for state_id, state in states.items():
            path = paths[state_id]
            meta = self.store.name(state_id, namespace, name if not path else f"{name}.{path}",
                                   session)
            rows.append(self._row(state, meta, namespace, name, path))
        old = self.db.get_object(namespace, name)
        self.db.put_object(ObjectRow(namespace, name, kind, structure, list(paths),
                                     list(paths.values()), old.created if old else now, now),
                           rows)
        if old is not None:
            gone = [i for i in old.state_ids if i not in paths]
            self.store.remove(gone)
            self.persistence.forget(namespace, gone)
        # A put is a commit like any other: written now under "sync", by the next flush
        # under "interval" (reload reports a state never flushed as lost, not damaged).
        self.persistence.reindex(list(states))
        return {"name": full, "states": {i: self.store.meta(i).version for i in states}}

    def moved_bytes(self, session: Session, namespace: str, name: str, ids: list[str],
                    uploaded: set[str]) -> PerDevice:
        """What naming ``ids`` as ``namespace/name`` moves into the namespace, per device,
        besides the uploads (counted by their transaction): resident states from elsewhere
        that ``session`` sees (its own), less the states of the object it replaces."""
        ledger = self.store.ledger
        out: PerDevice = {}
        for state_id in ids:
            entry = ledger.get(state_id)
            if state_id not in uploaded and entry is not None and entry.namespace != namespace \
                    and self.store.get(state_id, session) is not None:
                out = add(out, entry.per_device)
        old = self.db.get_object(namespace, name)
        for state_id in old.state_ids if old is not None else ():
            entry = ledger.get(state_id)
            if state_id not in ids and entry is not None and entry.namespace == namespace:
                out = add(out, entry.per_device, -1)
        return out

    def _row(self, state: State, meta: Meta, namespace: str, obj: str, path: str) -> StateRow:
        file = state_file(namespace, state.id)
        return StateRow(state.id, namespace, obj, path, cloudpickle.dumps(type(state)),
                        state.name, state.tag, _leaves(state.value), state_nbytes(state),
                        meta.version, meta.writer, meta.updated, describe_sharding(state.value),
                        file, 0)

    def get(self, session: Session, full: str) -> tuple[ObjectRow, list[StateRow]]:
        where = "POST /v1/objects/get"
        namespace, name = split_name(full, where)
        self.visible(session, namespace, "read", where)
        obj = self.db.get_object(namespace, name)
        if obj is None:
            raise NotFoundError(f"{where}: no object {full!r}. "
                                f"client.list({namespace!r}) shows what exists.")
        rows = {r.id: r for r in self.db.states(namespace) if r.object == name}
        return obj, [rows[i] for i in obj.state_ids if i in rows]

    def describe(self, row: StateRow) -> dict[str, Any]:
        meta = self.store.meta(row.id)
        state = self.store.by_id(row.id)
        damaged = self.persistence.damaged
        status = "ok" if state is not None else "damaged" if row.id in damaged else "lost"
        out = {
            "name": row.full_name, "id": row.id, "kind": _class_name(row.cls),
            "leaves": _leaves(state.value) if state is not None else row.leaves,
            "bytes": state_nbytes(state) if state is not None else row.nbytes,
            "version": meta.version if meta else row.version,
            "writer": meta.writer if meta else row.writer,
            "updated_at": meta.updated if meta else row.updated,
            "durable_version": meta.durable if meta else row.durable_version,
            "status": status,
            "devices": _devices(state.value) if state is not None else [],
        }
        if row.id in damaged:
            out["problem"] = damaged[row.id]
        return out

    def delete(self, namespace: str, name: str) -> list[str]:
        ids = self.db.delete_object(namespace, name)
        self.store.remove(ids)
        self.persistence.forget(namespace, ids)
        return ids


def _devices(value: Any) -> list[str]:
    """Where a value's arrays live, as ``platform:id`` (``host`` for non-device data)."""
    found = set()
    for leaf in jax.tree_util.tree_leaves(value):
        if isinstance(leaf, jax.Array):
            found |= {f"{d.platform}:{d.id}" for d in leaf.sharding.device_set}
        else:
            found.add("host")
    return sorted(found)


def _class_name(blob: bytes) -> str:
    try:
        cls = cloudpickle.loads(blob)
        return f"{cls.__module__}.{cls.__qualname__}"
    except Exception:
        return "unknown"



# -- services: POST /v1/objects/put and /get, run as calls ---------------------------
def put_object(call: Any, request: PutRequest, rt: Any) -> PutReply:
    """Stages the uploaded values of an object's states (one transaction), then names them."""
    where = "POST /v1/objects/put"
    namespace, name = split_name(request.name, where)
    rt.registry.visible(call.session, namespace, "submit", where)
    if request.structure.buffers:
        raise ProtocolError(f"{where}: the structure section must be one pickle without "
                            "out-of-band buffers.")
    # The put's bytes count against its namespace, checked before anything moves.
    charge = Charge(namespace, rt.registry.moved_bytes(
        call.session, namespace, name, list(request.paths), set(request.uploads)))
    if request.states is not None:
        push_states(call, PushRequest(session=request.session, uploads=request.uploads,
                                      states=request.states), rt, where, charge=charge)
    else:
        rt.quotas.check_bytes({namespace: charge.extra}, where)
    rt.share(call, request, where)
    result = rt.registry.put(call.session, request.name, request.object_kind,
                             bytes(request.structure.payload), dict(request.paths))
    return PutReply(state_versions=result["states"])


def delete_named(call: Any, namespace: str, name: str, rt: Any) -> list[str]:
    """Deletes a named object (its states leave the store); returns their ids."""
    rt.share(call, None, f"DELETE /v1/namespaces/{namespace}/objects/{name}",
             namespace=namespace, name=name)
    return rt.registry.delete(namespace, name)


def get_object(call: Any, obj: ObjectRow, pull: bool, rt: Any) -> GetReply:
    """The object's structure and, with ``pull``, its states' values (``call.keys``)."""
    ids = list(call.keys)
    rt.share(call, None, "POST /v1/objects/get", obj=obj, pull=pull)
    versions = {i: rt.store.meta(i).version for i in ids}
    states = None
    if pull:
        values = to_host([StateValue(i, rt.store.by_id(i).value) for i in ids],
                         "POST /v1/objects/get")
        states = pack(values, refs=False, code=False)
    return GetReply(object_kind=obj.kind, state_versions=versions,
                    structure=Section(obj.structure), states=states)
