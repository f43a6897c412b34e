"""Who is calling: a ``Principal`` (namespace and scope) resolved from the bearer token.

Tokens from the settings are the operator's: admin on every namespace. Tokens
made with ``statehost token create`` belong to one namespace and one scope;
each scope includes the ones before it: read < invoke < submit < admin. They
are looked up in a :class:`TokenTable`, in memory, so no request waits for SQLite.
"""

from __future__ import annotations

import hmac
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from statehost.server.persistence.database import SCOPES, hash_token

__all__ = ["Principal", "TokenTable", "resolve"]

log = logging.getLogger("statehost.server")


@dataclass(frozen=True)
class Principal:
    namespace: str | None  # None: every namespace
    scope: str
    label: str

    def can(self, namespace: str, scope: str) -> bool:
        """May this caller act with ``scope`` on ``namespace``?"""
        if self.namespace is not None and self.namespace != namespace:
            return False
        return SCOPES.index(self.scope) >= SCOPES.index(scope)

    def has(self, scope: str) -> bool:
        """Has this caller ``scope`` on at least its own namespace?"""
        return SCOPES.index(self.scope) >= SCOPES.index(scope)


class TokenTable:
    """The live namespace tokens of ``statehost.db``, in memory: token hash -> ``Principal``.

    Tokens are created and revoked by ``statehost token``, another process writing the same
    SQLite file, so the table polls for changes: a thread of its own asks SQLite every
    ``interval`` seconds for ``PRAGMA data_version`` (which changes when any other
    connection commits) and reloads the table when it changed. Why a poller rather than a
    look-up on a miss: a revoked token is a *hit*, so revocations need the poll anyway, and
    one mechanism keeps created and revoked tokens equally fresh (within ``interval`` plus
    one read). The event loop only reads a dict; when another process holds the database
    locked, only this thread waits, and requests are answered from the last table.

    Arguments:
        path: the server's ``statehost.db``.
        interval: seconds between polls.
    """

    def __init__(self, path: Path, interval: float = 0.25):
        self.path = path
        self.interval = interval
        self._principals: dict[str, Principal] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._version: int | None = None

    def get(self, token: str) -> Principal | None:
        """The principal of a live namespace token, or ``None``; never touches SQLite."""
        return self._principals.get(hash_token(token))

    def start(self) -> None:
        """Loads the table now (blocking; call it off the event loop) and starts polling."""
        # check_same_thread=False: opened here, then used only by the polling thread.
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.reload()
        self._thread = threading.Thread(target=self._poll, name="statehost-tokens",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._conn is not None:
            self._conn.close()

    def reload(self) -> None:
        """Re-reads every live token (one statement, so one consistent snapshot)."""
        assert self._conn is not None
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        rows = self._conn.execute(
            "SELECT hash, namespace, scope, label FROM tokens WHERE revoked IS NULL").fetchall()
        self._principals = {  # one assignment: readers see the old table or the new one
            h: Principal(ns, scope, label or f"token {h[:8]}") for h, ns, scope, label in rows}
        self._version = version

    def _poll(self) -> None:
        assert self._conn is not None
        while not self._stop.wait(self.interval):
            try:
                if self._conn.execute("PRAGMA data_version").fetchone()[0] != self._version:
                    self.reload()
            except sqlite3.Error:  # locked past the busy timeout, say: the next round retries
                log.warning("reloading tokens from %s failed; retrying", self.path,
                            exc_info=True)


def resolve(token: str, server_tokens: tuple[str, ...],
            table: TokenTable | None) -> Principal | None:
    """The caller behind ``token``: an operator token, a live namespace token, or ``None``."""
    for known in server_tokens:
        if hmac.compare_digest(token.encode(), known.encode()):
            return Principal(None, "admin", "server token")
    return table.get(token) if table is not None else None
