"""``Persistence``: the one object that makes named states durable, owned by the runtime.

It knows each namespace's :class:`Durability`, writes given values to state files and
records their versions in the database (``write``), writes the current values of named
states (``flush``), says which ones are behind their disk copy (``dirty``), and puts them
all back on the devices at start (``reload``). Routes and the call path never touch files
or the durable columns of the database themselves.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from statehost.server.persistence.database import (
    DamagedDatabaseError,
    Database,
    ObjectRow,
    StateRow,
)
from statehost.server.persistence.durability import Durability
from statehost.server.persistence.files import describe_sharding, save_value
from statehost.server.persistence.reload import reload_states
from statehost.server.store import StateStore

__all__ = ["Persistence", "StateRecord", "state_file"]

log = logging.getLogger("statehost.server")

PyTree = Any


def state_file(namespace: str, state_id: str) -> str:
    """Where a named state's file lives, relative to the data directory."""
    return f"states/{namespace}/{state_id}.safetensors"


@dataclass(frozen=True)
class StateRecord:
    """One value of a named state to write: exactly this value, as this version."""

    id: str
    value: PyTree
    version: int
    writer: str
    updated: float


def index_meta(row: StateRow, obj: ObjectRow | None, record: StateRecord,
               sharding: list[dict], durability: Durability) -> dict[str, str]:
    """The safetensors metadata of a state file: enough to rebuild its database rows.

    ``version`` is read by ``reload``; ``index`` (JSON) by ``statehost repair``, which
    rebuilds the ``objects`` and ``states`` tables from the files alone.
    """
    index: dict[str, Any] = {
        "id": row.id, "namespace": row.namespace, "object": row.object, "path": row.path,
        "class": base64.b64encode(row.cls).decode(), "name": row.label, "tag": row.tag,
        "version": record.version, "writer": record.writer, "updated": record.updated,
        "sharding": sharding, "durability": str(durability),
    }
    if obj is not None:
        index["object_row"] = {
            "kind": obj.kind, "structure": base64.b64encode(obj.structure).decode(),
            "state_ids": obj.state_ids, "paths": obj.paths,
            "created": obj.created, "updated": obj.updated,
        }
    return {"version": str(record.version), "index": json.dumps(index, sort_keys=True)}


class Persistence:
    """Durability of named states: state files under ``data_dir`` plus the SQLite index.

    Nothing touches the disk before :meth:`open`, which the app's lifespan calls at start.

    Arguments:
        data_dir: the server's data directory (``statehost.db`` and ``states/``).
        store: the resident states, read by :meth:`flush` and :meth:`dirty`.
        default_durability: the durability a namespace gets when first used.
    """

    def __init__(self, data_dir: Path, store: StateStore,
                 default_durability: Durability | str = Durability.INTERVAL):
        self.data_dir = data_dir
        self.db_path = data_dir / "statehost.db"
        self.store = store
        self.default_durability = Durability(default_durability)
        self.damaged: dict[str, str] = {}  # state id -> why reload could not load it
        # Every namespace and its durability: asked on every commit and by the gauges, so
        # kept in memory (only this server writes the namespaces table).
        self._durability: dict[str, Durability] = {}
        self._db: Database | None = None
        self._reindex: set[str] = set()  # files whose index (object, structure) is stale
        self._reindex_lock = threading.Lock()

    @property
    def db(self) -> Database:
        if self._db is None:
            raise RuntimeError("Persistence.db: the database is not open; call open() first "
                               "(the app's lifespan does).")
        return self._db

    def open(self) -> None:
        """Opens and checks the database; raises :class:`DamagedDatabaseError` if damaged.

        Damaged means: SQLite cannot read it, ``PRAGMA quick_check`` fails, or it holds no
        state although ``states/`` holds state files (a database truncated or replaced by
        an empty one), so the server never starts silently empty.
        """
        db = Database(self.db_path)
        try:
            if not db.states():
                files = sum(1 for _ in (self.data_dir / "states").glob("*/*.safetensors"))
                if files:
                    raise DamagedDatabaseError(
                        self.db_path, f"it lists no named state, yet {files} state file(s) "
                        "are on disk (was it truncated, deleted or replaced?)")
            self._durability = {ns: Durability(d) for ns, d in db.namespaces().items()}
        except BaseException:
            db.close()
            raise
        self._db = db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()

    # -- durability ---------------------------------------------------------------
    def durability(self, namespace: str) -> Durability:
        """The namespace's durability (the namespace is created with the default if new)."""
        known = self._durability.get(namespace)
        if known is None:
            known = self._durability[namespace] = Durability(
                self.db.ensure_namespace(namespace, self.default_durability))
        return known

    def namespaces(self) -> dict[str, Durability]:
        """Every namespace the database knows, with its durability; never touches SQLite."""
        return dict(self._durability)

    def set_durability(self, namespace: str, durability: Durability | str) -> None:
        durability = Durability(durability)
        self.db.set_durability(namespace, durability)
        self._durability[namespace] = durability

    # -- writing --------------------------------------------------------------------
    def write(self, records: list[StateRecord]) -> int:
        """Writes these exact values, as these versions, to disk now; returns how many.

        Takes the values rather than reading the store, so a ``sync`` commit can be made
        durable before it is installed in memory. A record whose state is not (or no
        longer) a named state in the database is skipped.
        """
        rows, objects = [], {}
        for record in records:
            row = self.db.state(record.id)
            if row is None:
                continue
            key = (row.namespace, row.object)
            if key not in objects:
                objects[key] = self.db.get_object(*key)
            sharding = describe_sharding(record.value)
            save_value(self.data_dir / row.file, record.value,
                       meta=index_meta(row, objects[key], record, sharding,
                                       self.durability(row.namespace)))
            rows.append((record.id, record.version, record.writer, record.updated,
                         record.version, json.dumps(sharding)))
            meta = self.store.meta(record.id)
            if meta is not None:
                meta.durable = max(meta.durable, record.version)
        if rows:
            self.db.record_versions(rows)
            with self._reindex_lock:
                self._reindex.difference_update(r[0] for r in rows)
        return len(rows)

    def flush(self, ids: list[str]) -> int:
        """Writes the current values of these named states (none-durability ones are skipped).

        Call it holding the states' scheduler locks, so each value is a committed one.
        Returns how many were written.
        """
        records = []
        for state_id in ids:
            state, meta = self.store.by_id(state_id), self.store.meta(state_id)
            if state is None or meta is None or meta.namespace is None \
                    or self.durability(meta.namespace) is Durability.NONE:
                with self._reindex_lock:
                    self._reindex.discard(state_id)
                continue
            records.append(StateRecord(state_id, state._value, meta.version, meta.writer,
                                       meta.updated))
        return self.write(records)

    def after_commit(self, ids: list[str]) -> None:
        """Makes a commit durable now where the namespace asks for ``sync``."""
        sync = []
        for state_id in ids:
            meta = self.store.meta(state_id)
            if meta is not None and meta.namespace and \
                    self.durability(meta.namespace) is Durability.SYNC:
                sync.append(state_id)
        if sync:
            self.flush(sync)

    def reindex(self, ids: list[str]) -> None:
        """These states' object changed (a put): rewrite their files' index like a commit.

        Every state file carries its object's row, so ``statehost repair`` can rebuild the
        database from the files; a put that names states or changes an object's structure
        makes that copy stale, so the files are rewritten now under ``sync`` and by the next
        flush under ``interval``.
        """
        with self._reindex_lock:
            self._reindex.update(ids)
        self.after_commit(ids)

    def dirty(self) -> list[str]:
        """Named states whose newest version, or newest index, is not on disk yet."""
        dirty = self.store.dirty()
        known = set(dirty)
        with self._reindex_lock:
            stale = [i for i in self._reindex if i not in known]
        return dirty + stale

    def forget(self, namespace: str, ids: list[str]) -> None:
        """Deletes the files of these named states (after the database forgot them)."""
        for state_id in ids:
            (self.data_dir / state_file(namespace, state_id)).unlink(missing_ok=True)

    # -- reading ----------------------------------------------------------------------
    def reload(self, store: StateStore) -> int:
        """Puts every named state back into ``store``; damaged files are reported, not fatal.

        Returns how many states were loaded; :attr:`damaged` says why the others were not.
        """
        return reload_states(self.db, self.data_dir, store, self.durability, self.damaged)
