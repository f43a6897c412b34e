"""Named objects: put under ``namespace/name``, read back, described, deleted.

``put`` moves a client's states into a namespace and records the object's
structure (a pickle whose states are references); ``get`` sends both back.
Making them durable (state files, durability, reload) is ``persistence/``'s job.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import cloudpickle
import jax
import numpy as np

from statehost import State
from statehost.server.errors import ApiError
from statehost.server.persistence import (
    Database,
    ObjectRow,
    Persistence,
    StateRow,
    state_file,
)
from statehost.server.persistence.files import describe_sharding
from statehost.server.store import Meta, Session, StateStore, state_nbytes

__all__ = ["Registry", "split_name"]

log = logging.getLogger("statehost.server")

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")


def split_name(full: Any, where: str) -> tuple[str, str]:
    """``"team/net"`` -> ``("team", "net")``, or a 400 that shows the expected form."""
    parts = full.split("/") if isinstance(full, str) else []
    if len(parts) != 2 or not all(_NAME.match(p) for p in parts):
        raise ApiError(
            400, "ProtocolError",
            f"{where}: {full!r} is not a name of the form 'namespace/name' (letters, digits, "
            "'_', '-', '.'; e.g. 'team/net').",
        )
    return parts[0], parts[1]


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
        """404 for a namespace the caller cannot read (never 403: names stay hidden)."""
        principal = getattr(session_or_principal, "principal", session_or_principal)
        if not principal.can(namespace, "read"):
            raise ApiError(404, "NotFound",
                           f"{where}: no namespace {namespace!r} visible to this token.")
        if not principal.can(namespace, scope):
            raise ApiError(403, "AuthError",
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
                raise ApiError(404, "StateNotFoundError",
                               f"{where}: state {state_id} of {full!r} is not on the server.",
                               missing=[state_id])
            row = self.db.state(state_id)
            if row is not None and (row.namespace, row.object) != (namespace, name):
                raise ApiError(
                    409, "ProtocolError",
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

    def _row(self, state: State, meta: Meta, namespace: str, obj: str, path: str) -> StateRow:
        file = state_file(namespace, state.id)
        return StateRow(state.id, namespace, obj, path, cloudpickle.dumps(type(state)),
                        state.name, state.tag, _leaves(state._value), state_nbytes(state),
                        meta.version, meta.writer, meta.updated, describe_sharding(state._value),
                        file, 0)

    def get(self, session: Session, full: str) -> tuple[ObjectRow, list[StateRow]]:
        where = "POST /v1/objects/get"
        namespace, name = split_name(full, where)
        self.visible(session, namespace, "read", where)
        obj = self.db.get_object(namespace, name)
        if obj is None:
            raise ApiError(404, "NotFound", f"{where}: no object {full!r}. "
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
            "leaves": _leaves(state._value) if state is not None else row.leaves,
            "bytes": state_nbytes(state) if state is not None else row.nbytes,
            "version": meta.version if meta else row.version,
            "writer": meta.writer if meta else row.writer,
            "updated_at": meta.updated if meta else row.updated,
            "durable_version": meta.durable if meta else row.durable_version,
            "status": status,
            "devices": _devices(state._value) if state is not None else [],
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

