"""Resident states and the client sessions that own them.

A state's value stays a ``jax.Array`` on this server's devices, sharded as the
last call left it. Each anonymous state belongs to the session that sent it;
other sessions cannot see it, and it is freed with its session.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

import jax

from statehost import State

__all__ = ["Session", "SessionTable", "StateStore", "state_nbytes"]


def state_nbytes(state: State) -> int:
    return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(state._value))


@dataclass
class Session:
    id: str
    created: float
    last_seen: float
    calls: int = 0
    states: set[str] = field(default_factory=set)


class SessionTable:
    """Open sessions, their idle time and the states they own."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self) -> Session:
        now = time.monotonic()
        session = Session(secrets.token_hex(16), now, now)
        with self._lock:
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        """The session, marked as seen now; ``None`` if unknown or expired."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.last_seen = time.monotonic()
            return session

    def pop(self, session_id: str) -> Session | None:
        with self._lock:
            return self._sessions.pop(session_id, None)

    def pop_expired(self, now: float | None = None) -> list[Session]:
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [s for s in self._sessions.values() if now - s.last_seen > self.ttl]
            for s in gone:
                del self._sessions[s.id]
        return gone

    def __len__(self) -> int:
        return len(self._sessions)


class StateStore:
    """id -> resident ``State``, each owned by one session."""

    def __init__(self) -> None:
        self._states: dict[str, State] = {}
        self._owner: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, state_id: str, session: Session) -> State | None:
        """The state if it exists and ``session`` may see it."""
        state = self._states.get(state_id)
        if state is None or self._owner.get(state_id) != session.id:
            return None
        return state

    def add(self, state: State, session: Session) -> None:
        with self._lock:
            self._states[state.id] = state
            self._owner[state.id] = session.id
            session.states.add(state.id)

    def free(self, session: Session) -> list[str]:
        """Drops every state ``session`` owns; returns their ids."""
        with self._lock:
            ids = [i for i in session.states if self._owner.get(i) == session.id]
            for i in ids:
                self._states.pop(i, None)
                self._owner.pop(i, None)
            session.states.clear()
        return ids

    def nbytes(self) -> int:
        with self._lock:
            states = list(self._states.values())
        return sum(state_nbytes(s) for s in states)

    def __len__(self) -> int:
        return len(self._states)
