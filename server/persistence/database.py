"""The server's metadata in SQLite (WAL): namespaces, tokens, named objects, states, functions.

Array data lives in safetensors files (``files.py``); this database says
which states exist, under which names, at which version, and where their
files are. One connection, guarded by a lock, shared by the worker threads.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from statehost._errors import StatehostError
from statehost.server.persistence.permissions import (
    FILE_MODE,
    make_private_dir,
    make_private_file,
    tighten,
)

__all__ = ["QUOTA_FIELDS", "SCOPES", "DamagedDatabaseError", "Database", "FunctionRow",
           "ObjectRow", "StateRow", "TokenRow", "hash_token"]

# Each scope includes the ones before it.
SCOPES = ("read", "invoke", "submit", "admin")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
    name TEXT PRIMARY KEY, durability TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, namespace TEXT NOT NULL, scope TEXT NOT NULL, label TEXT NOT NULL,
    created REAL NOT NULL, revoked REAL);
CREATE TABLE IF NOT EXISTS objects (
    namespace TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL, structure BLOB NOT NULL,
    state_ids TEXT NOT NULL, paths TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (namespace, name));
CREATE TABLE IF NOT EXISTS states (
    id TEXT PRIMARY KEY, namespace TEXT NOT NULL, object TEXT NOT NULL, path TEXT NOT NULL,
    cls BLOB NOT NULL, label TEXT, tag TEXT, leaves TEXT NOT NULL, nbytes INTEGER NOT NULL,
    version INTEGER NOT NULL, writer TEXT NOT NULL, updated REAL NOT NULL,
    sharding TEXT NOT NULL, file TEXT NOT NULL, durable_version INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS states_by_object ON states (namespace, object);
CREATE TABLE IF NOT EXISTS functions (
    namespace TEXT NOT NULL, name TEXT NOT NULL, payload BLOB NOT NULL, digest TEXT NOT NULL,
    state_ids TEXT NOT NULL, signature TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (namespace, name));
"""

#: A namespace's quotas: columns of ``namespaces`` (NULL: the server's default applies).
QUOTA_FIELDS = ("max_bytes", "max_bytes_per_device", "max_sessions", "max_queued")

# Columns added after the first release, with their type: a database made before them
# gets them at open (``ALTER TABLE ... ADD COLUMN``), so an old statehost.db still opens.
_ADDED_COLUMNS = {"namespaces": [(name, "INTEGER") for name in QUOTA_FIELDS]}


_MSG_DAMAGED = (
    "statehost: the metadata database {path} is damaged: {what}. The server does not start on "
    "it: it says which named states exist, and running on it would hide or lose them. The "
    "state values are kept apart, in {states}. To recover:\n"
    "  1. stop every statehost process that uses {data_dir}, and keep a copy of it "
    "(e.g. cp -a {data_dir} {data_dir}.bak);\n"
    "  2. run `statehost repair --data-dir {data_dir}`: it moves the damaged database aside and "
    "rebuilds the named objects and states from the state files;\n"
    "  3. tokens and registered functions are not in state files: recreate tokens with "
    "`statehost token create` and register functions again.\n"
    "Or restore {path} from a backup."
)


class DamagedDatabaseError(StatehostError, RuntimeError):
    """The metadata database is unreadable, fails its integrity check, or lost its rows."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what
        super().__init__(_MSG_DAMAGED.format(path=path, what=what, data_dir=path.parent,
                                             states=path.parent / "states"))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class TokenRow:
    hash: str
    namespace: str
    scope: str
    label: str
    created: float
    revoked: float | None


@dataclass
class ObjectRow:
    namespace: str
    name: str
    kind: str
    structure: bytes
    state_ids: list[str]
    paths: list[str]
    created: float
    updated: float


@dataclass
class StateRow:
    id: str
    namespace: str
    object: str
    path: str
    cls: bytes
    label: str | None
    tag: str | None
    leaves: list[dict[str, Any]]
    nbytes: int
    version: int
    writer: str
    updated: float
    sharding: list[dict[str, Any]]
    file: str
    durable_version: int

    @property
    def full_name(self) -> str:
        """``object`` for a single state, ``object.path`` for a state inside a module."""
        return self.object if not self.path else f"{self.object}.{self.path}"


@dataclass
class FunctionRow:
    namespace: str
    name: str
    payload: bytes
    digest: str
    state_ids: list[str]
    signature: dict[str, Any]
    created: float


class Database:
    """The metadata store; every method is one transaction."""

    def __init__(self, path: Path):
        make_private_dir(path.parent)
        # SQLite gives its -wal and -shm files the database file's mode: make that 0600
        # before SQLite creates it 0644. Ones left by older versions are tightened too.
        make_private_file(path)
        for suffix in ("-wal", "-shm"):
            tighten(path.with_name(path.name + suffix), FILE_MODE)
        self.path = path
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            problems = [r[0] for r in self._conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise DamagedDatabaseError(path, "its integrity check failed ("
                                           + "; ".join(problems) + ")")
            self._conn.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed", ...
            self._conn.close()
            raise DamagedDatabaseError(path, f"SQLite cannot read it ({exc})") from exc
        except BaseException:
            self._conn.close()
            raise
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _migrate(self) -> None:
        """Adds the columns an older database lacks (see ``_ADDED_COLUMNS``)."""
        for table, columns in _ADDED_COLUMNS.items():
            have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns:
                if name not in have:
                    self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _all(self, sql: str, *args: Any) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- namespaces --------------------------------------------------------------
    def ensure_namespace(self, name: str, durability: str) -> str:
        """Creates the namespace if needed; returns its durability."""
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO namespaces (name, durability, created) "
                      "VALUES (?, ?, ?)",
                      (name, durability, time.time()))
            return c.execute("SELECT durability FROM namespaces WHERE name = ?",
                             (name,)).fetchone()[0]

    def set_durability(self, name: str, durability: str) -> None:
        with self._tx() as c:
            c.execute("INSERT INTO namespaces (name, durability, created) VALUES (?, ?, ?) "
                      "ON CONFLICT(name) DO UPDATE "
                      "SET durability = excluded.durability", (name, durability, time.time()))

    def namespaces(self) -> dict[str, str]:
        return dict(self._all("SELECT name, durability FROM namespaces ORDER BY name"))

    def quotas(self) -> dict[str, dict[str, int | None]]:
        """Every namespace's own quotas (``QUOTA_FIELDS``; None: not set)."""
        rows = self._all(f"SELECT name, {', '.join(QUOTA_FIELDS)} FROM namespaces")
        return {r[0]: dict(zip(QUOTA_FIELDS, r[1:], strict=True)) for r in rows}

    def set_quotas(self, name: str, durability: str, quotas: dict[str, int | None]) -> None:
        """Sets these quotas of ``name`` (None clears one), creating the namespace with
        ``durability`` if it does not exist."""
        assert set(quotas) <= set(QUOTA_FIELDS), quotas
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO namespaces (name, durability, created) "
                      "VALUES (?, ?, ?)", (name, durability, time.time()))
            if quotas:
                sets = ", ".join(f"{k} = ?" for k in quotas)
                c.execute(f"UPDATE namespaces SET {sets} WHERE name = ?",
                          (*quotas.values(), name))

    # -- tokens --------------------------------------------------------------------
    def create_token(self, namespace: str, scope: str, label: str = "") -> str:
        """Stores a new token (hashed) and returns it; it is never shown again."""
        if scope not in SCOPES:
            raise ValueError(f"scope {scope!r} is not one of {', '.join(SCOPES)}")
        token = "sh_" + secrets.token_urlsafe(32)
        with self._tx() as c:
            c.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, NULL)",
                      (hash_token(token), namespace, scope, label, time.time()))
        return token

    def tokens(self) -> list[TokenRow]:
        return [TokenRow(*r) for r in self._all("SELECT * FROM tokens ORDER BY created")]

    def revoke_token(self, prefix: str) -> int:
        """Revokes every live token whose hash starts with ``prefix``; returns how many."""
        with self._tx() as c:
            return c.execute("UPDATE tokens SET revoked = ? WHERE hash LIKE ? AND revoked IS NULL",
                             (time.time(), prefix + "%")).rowcount

    # -- objects and states -----------------------------------------------------------
    def put_object(self, obj: ObjectRow, states: list[StateRow]) -> None:
        with self._tx() as c:
            old = c.execute("SELECT state_ids FROM objects WHERE namespace = ? AND name = ?",
                            (obj.namespace, obj.name)).fetchone()
            if old is not None:
                gone = set(json.loads(old[0])) - set(obj.state_ids)
                c.executemany("DELETE FROM states WHERE id = ?", [(i,) for i in gone])
            c.execute("INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (obj.namespace, obj.name, obj.kind, obj.structure,
                       json.dumps(obj.state_ids), json.dumps(obj.paths), obj.created,
                       obj.updated))
            c.executemany("INSERT OR REPLACE INTO states VALUES "
                          "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                          [_state_tuple(s) for s in states])

    def get_object(self, namespace: str, name: str) -> ObjectRow | None:
        rows = self._all("SELECT * FROM objects WHERE namespace = ? AND name = ?", namespace, name)
        return _object(rows[0]) if rows else None

    def objects(self, namespace: str) -> list[ObjectRow]:
        rows = self._all("SELECT * FROM objects WHERE namespace = ? ORDER BY name", namespace)
        return [_object(r) for r in rows]

    def delete_object(self, namespace: str, name: str) -> list[str]:
        """Deletes a named object and its states; returns the state ids."""
        with self._tx() as c:
            row = c.execute("SELECT state_ids FROM objects WHERE namespace = ? AND name = ?",
                            (namespace, name)).fetchone()
            if row is None:
                return []
            ids = json.loads(row[0])
            c.execute("DELETE FROM objects WHERE namespace = ? AND name = ?", (namespace, name))
            c.executemany("DELETE FROM states WHERE id = ?", [(i,) for i in ids])
            return ids

    def states(self, namespace: str | None = None) -> list[StateRow]:
        if namespace is None:
            rows = self._all("SELECT * FROM states ORDER BY namespace, object, path")
        else:
            rows = self._all("SELECT * FROM states WHERE namespace = ? ORDER BY object, path",
                             namespace)
        return [_state(r) for r in rows]

    def state(self, state_id: str) -> StateRow | None:
        rows = self._all("SELECT * FROM states WHERE id = ?", state_id)
        return _state(rows[0]) if rows else None

    def record_versions(self, rows: list[tuple[str, int, str, float, int, str]]) -> None:
        """``(id, version, writer, updated, durable_version, sharding json)`` per state."""
        with self._tx() as c:
            c.executemany("UPDATE states SET version = ?, writer = ?, updated = ?, "
                          "durable_version = ?, sharding = ? WHERE id = ?",
                          [(v, w, u, d, s, i) for i, v, w, u, d, s in rows])

    # -- functions ---------------------------------------------------------------------
    def put_function(self, row: FunctionRow) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO functions VALUES (?, ?, ?, ?, ?, ?, ?)",
                      (row.namespace, row.name, row.payload, row.digest,
                       json.dumps(row.state_ids), json.dumps(row.signature), row.created))

    def functions(self, namespace: str) -> list[FunctionRow]:
        rows = self._all("SELECT * FROM functions WHERE namespace = ? ORDER BY name", namespace)
        return [_function(r) for r in rows]

    def function(self, namespace: str, name: str) -> FunctionRow | None:
        rows = self._all("SELECT * FROM functions WHERE namespace = ? AND name = ?",
                         namespace, name)
        return _function(rows[0]) if rows else None



def _state_tuple(s: StateRow) -> tuple:
    return (s.id, s.namespace, s.object, s.path, s.cls, s.label, s.tag, json.dumps(s.leaves),
            s.nbytes, s.version, s.writer, s.updated, json.dumps(s.sharding), s.file,
            s.durable_version)


def _state(r: tuple) -> StateRow:
    return StateRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), r[8], r[9],
                    r[10], r[11], json.loads(r[12]), r[13], r[14])


def _object(r: tuple) -> ObjectRow:
    return ObjectRow(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]), r[6], r[7])


def _function(r: tuple) -> FunctionRow:
    return FunctionRow(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]), r[6])
