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
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from statehost.server.persistence.database import (
    DamagedDatabaseError,
    Database,
    ObjectRow,
    StateRow,
)
from statehost.server.persistence.durability import Durability
from statehost.server.persistence.errors import StorageError, describe_failure
from statehost.server.persistence.files import describe_sharding, save_value
from statehost.server.persistence.reload import reload_states
from statehost.server.store import StateStore

__all__ = ["Persistence", "StateRecord", "state_file"]

log = logging.getLogger("statehost.server")

PyTree = Any

_MSG_NOT_WRITTEN = (
    "the call was not applied: the server could not write {count} named state(s) of "
    "namespace(s) {namespaces} to its disk ({why}). An operator must fix the server's disk "
    "(free space, permissions, a read-only mount; the server log names the files); retry "
    "afterwards."
)
_MSG_BACKLOG = (
    "the call was not applied: namespace {namespace!r} has a state {behind} commit(s) ahead of "
    "its copy on disk (the limit is max_unflushed_commits={limit}) and writing it to disk "
    "fails ({why}). New commits are refused so that no more work is at risk if the server "
    "stops. An operator must fix the server's disk (free space, permissions, a read-only "
    "mount; the server log names the files); commits are accepted again after the next "
    "successful flush."
)


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
        failures: counts failed disk writes (``statehost_flush_failures_total``).
        max_unflushed_commits: :meth:`check_backlog`'s bound.
    """

    def __init__(self, data_dir: Path, store: StateStore,
                 default_durability: Durability | str = Durability.INTERVAL, *,
                 failures: Counter | None = None, max_unflushed_commits: int = 1000):
        self.data_dir = data_dir
        self.db_path = data_dir / "statehost.db"
        self.store = store
        self.default_durability = Durability(default_durability)
        self.damaged: dict[str, str] = {}  # state id -> why reload could not load it
        # Every namespace and its durability: asked on every commit and by the gauges, so
        # kept in memory (only this server writes the namespaces table).
        self._durability: dict[str, Durability] = {}
        self._quotas: dict[str, dict[str, int | None]] = {}  # the same, for quotas
        self.quotas_changed = 0  # counts set_quotas calls, for caches of what they decide
        self._db: Database | None = None
        self._reindex: set[str] = set()  # files whose index (object, structure) is stale
        self._reindex_lock = threading.Lock()
        self.failures = failures
        self.max_unflushed_commits = max_unflushed_commits
        # state id -> (namespace, why) for each state whose last write to disk failed
        self._failed: dict[str, tuple[str, str]] = {}

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
            self._quotas = db.quotas()
            self.quotas_changed += 1
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

    # -- quotas (their meaning and enforcement: server/quotas.py) -------------------------
    def quotas(self, namespace: str) -> dict[str, int | None]:
        """The namespace's own quotas (None: not set; the server default applies); never
        touches SQLite."""
        return dict(self._quotas.get(namespace, {}))

    def set_quotas(self, namespace: str, quotas: dict[str, int | None]) -> None:
        """Sets (None: clears) these quotas, creating the namespace if new."""
        durability = self.durability(namespace)
        self.db.set_quotas(namespace, durability, quotas)
        self._quotas[namespace] = {**self._quotas.get(namespace, {}), **quotas}
        self.quotas_changed += 1

    # -- writing --------------------------------------------------------------------
    def write(self, records: list[StateRecord]) -> int:
        """Writes these exact values, as these versions, to disk now; returns how many.

        Takes the values rather than reading the store, so a ``sync`` commit can be made
        durable before it is installed in memory. A record whose state is not (or no
        longer) a named state in the database is skipped. Raises :class:`StorageError`
        if any record could not be written (the others still are): the server is then
        degraded (:meth:`problem`) until those states are written.
        """
        rows, objects, failed = [], {}, {}
        for record in records:
            row = self.db.state(record.id)
            if row is None:
                continue
            key = (row.namespace, row.object)
            if key not in objects:
                objects[key] = self.db.get_object(*key)
            sharding = describe_sharding(record.value)
            try:
                save_value(self.data_dir / row.file, record.value,
                           meta=index_meta(row, objects[key], record, sharding,
                                           self.durability(row.namespace)))
            except OSError as exc:  # the others may still be written: try them
                log.error("writing named state %s/%s to %s failed: %s", row.namespace,
                          row.full_name, self.data_dir / row.file, exc)
                failed[record.id] = (row.namespace, describe_failure(exc))
                continue
            rows.append((record.id, record.version, record.writer, record.updated,
                         record.version, json.dumps(sharding)))
        if rows:
            try:
                self.db.record_versions(rows)
            except sqlite3.Error as exc:
                log.error("recording written versions in %s failed: %s", self.db_path, exc)
                failed.update({r[0]: (self.db.state(r[0]).namespace, describe_failure(exc))
                               for r in rows})
                rows = []
        for state_id, version, *_ in rows:
            meta = self.store.meta(state_id)
            if meta is not None:
                meta.durable = max(meta.durable, version)
        with self._reindex_lock:
            self._reindex.difference_update(r[0] for r in rows)
            for r in rows:
                self._failed.pop(r[0], None)
            self._failed.update(failed)
        if failed:
            if self.failures is not None:
                self.failures.inc()
            raise StorageError(_MSG_NOT_WRITTEN.format(
                count=len(failed), namespaces=", ".join(sorted({ns for ns, _ in
                                                                failed.values()})),
                why="; ".join(sorted({why for _, why in failed.values()}))))
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
        with self._reindex_lock:
            for state_id in ids:
                self._failed.pop(state_id, None)
        for state_id in ids:
            (self.data_dir / state_file(namespace, state_id)).unlink(missing_ok=True)

    # -- failures ---------------------------------------------------------------------
    def problem(self) -> str | None:
        """Why the server is degraded (writes to disk fail), or ``None``.

        Shown by the open ``/v1/health``, so it names neither paths nor namespaces.
        """
        with self._reindex_lock:
            failed = list(self._failed.values())
        if not failed:
            return None
        return (f"writing named states to disk fails for {len(failed)} state(s) ("
                + "; ".join(sorted({why for _, why in failed}))
                + "); the server log names the files")

    def check_backlog(self, namespace: str) -> None:
        """Raises :class:`StorageError` if ``namespace`` should take no new commit now.

        That is when writing one of its states to disk failed, and one of its states is
        more than ``max_unflushed_commits`` commits ahead of its copy on disk. Cheap when
        nothing fails (the call path can ask before every commit).
        """
        with self._reindex_lock:
            whys = sorted({why for ns, why in self._failed.values() if ns == namespace})
        if not whys:
            return
        metas = [self.store.meta(i) for i in self.store.dirty()]
        behind = max((m.version - m.durable for m in metas
                      if m is not None and m.namespace == namespace), default=0)
        if behind > self.max_unflushed_commits:
            raise StorageError(_MSG_BACKLOG.format(namespace=namespace, behind=behind,
                                                   limit=self.max_unflushed_commits,
                                                   why="; ".join(whys)))

    # -- reading ----------------------------------------------------------------------
    def reload(self, store: StateStore) -> int:
        """Puts every named state back into ``store``; damaged files are reported, not fatal.

        Returns how many states were loaded; :attr:`damaged` says why the others were not.
        """
        return reload_states(self.db, self.data_dir, store, self.durability, self.damaged)
