"""Resident states, their versions, and the client sessions that own anonymous ones.

A state's value stays a ``jax.Array`` on this server's devices, sharded as the
last call left it. A state id has exactly one owner. An anonymous state belongs
to the session that sent it; other sessions cannot see it, and it is freed with
its session. A named state belongs to a namespace: every session whose token
may read that namespace sees it, and it lives until deleted. An id is never
taken over by another owner: while it is resident, and after it was freed (a
bounded memory of retired ids, kept with who may reuse them). Every commit of a
state bumps its version. A session belongs to the principal that opened it.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import jax

from statehost import State
from statehost.server.auth import Principal
from statehost.server.errors import ArrayNotFoundError
from statehost.server.ledger import Ledger, charged_namespace

__all__ = ["Meta", "Session", "SessionTable", "StateStore", "state_nbytes"]

_ANONYMOUS = Principal(None, "admin", "anonymous")

_MSG_NO_ARRAY = (
    "{where}: argument {name!r} is an array kept on the server that this session no longer "
    "has (freed when the client dropped it, or the session ended). Fix: pass a value that "
    "is alive in the client, or np.asarray(x) it there while it still is."
)


def state_nbytes(state: State) -> int:
    return sum(getattr(leaf, "nbytes", 0) for leaf in jax.tree_util.tree_leaves(state._value))


@dataclass
class Session:
    """A client's lifetime on the server. ``client`` says which client it is (``"host, pid
    123"``, as the client said at session open; ``"JSON API from 10.0.0.7"``), so that two
    clients with one token are told apart as writers."""

    id: str
    created: float
    last_seen: float
    principal: Principal = _ANONYMOUS
    states: set[str] = field(default_factory=set)
    client: str = ""
    # Outputs of the call stream's calls kept here (``wire.handle_name`` -> array), until
    # the client frees them or the session ends.
    handles: dict[str, Any] = field(default_factory=dict)
    # The reply frames of the stream's latest finished calls (call id -> bytes): a call
    # re-sent after a reconnect gets its first outcome, and is never applied twice.
    outcomes: OrderedDict[str, bytes] = field(default_factory=OrderedDict)
    running: dict[str, Any] = field(default_factory=dict)  # call id -> Future of its reply
    # The ids of its jobs not ended yet: they keep the session's states and handles (a
    # job outlives its client), and keep an idle session from expiring.
    jobs: set[str] = field(default_factory=set)
    # Why it was closed while jobs ran ("closed by DELETE /v1/sessions/{id}"); it is freed
    # when the last of them ends. ``None``: open (or closed and freed at once).
    closing: str | None = None

    @classmethod
    def for_request(cls, principal: Principal, client: str = "") -> Session:
        """A session that lives for one JSON request (it owns nothing when it ends)."""
        now = time.monotonic()
        return cls(secrets.token_hex(16), now, now, principal, client=client)

    def kept(self, name: str, where: str) -> Any:
        """The array kept here as ``name`` (``statehost.wire.handle_name``), or a 404."""
        try:
            return self.handles[name]
        except KeyError:
            raise ArrayNotFoundError(_MSG_NO_ARRAY.format(where=where, name=name),
                                     missing=[name]) from None

    @property
    def writer(self) -> str:
        """Who commits through this session, as ``info`` shows it: the token's label and
        the client, ``"bob (laptop, pid 4242)"``."""
        label = self.principal.label
        return f"{label} ({self.client})" if self.client else label


@dataclass
class Meta:
    """What the store knows of a state besides its value."""

    owner: str  # the session id of an anonymous state; "" for a named one
    namespace: str | None = None
    name: str | None = None  # "object" or "object.path" for a named state
    version: int = 0
    writer: str = ""
    updated: float = 0.0
    durable: int = 0  # the last version written to disk


class SessionTable:
    """Open sessions, their idle time and the states they own."""

    def __init__(self, ttl: float):
        self.ttl = ttl
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def create(self, principal: Principal = _ANONYMOUS, client: str = "") -> Session:
        now = time.monotonic()
        session = Session(secrets.token_hex(16), now, now, principal, client=client)
        with self._lock:
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str, principal: Principal) -> Session | None:
        """The session, marked as seen now; ``None`` if unknown, expired or not
        ``principal``'s (another caller's session is indistinguishable from none)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.principal != principal:
                return None
            session.last_seen = time.monotonic()
            return session

    def pop(self, session_id: str) -> Session | None:
        with self._lock:
            return self._sessions.pop(session_id, None)

    def pop_expired(self, now: float | None = None) -> list[Session]:
        """The sessions idle past the TTL, closed; one with a job going is not idle (its
        TTL counts from its last job's end)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [s for s in self._sessions.values()
                    if now - s.last_seen > self.ttl and not s.jobs]
            for s in gone:
                del self._sessions[s.id]
        return gone

    def all(self) -> list[Session]:
        """The open sessions, oldest first."""
        with self._lock:
            return list(self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)

    # -- jobs keep their session: open, or closed but not freed ----------------------------
    def hold(self, session: Session, job_id: str) -> bool:
        """Records that job ``job_id`` needs ``session``; ``False`` if it is closed already."""
        with self._lock:
            if self._sessions.get(session.id) is not session:
                return False
            session.jobs.add(job_id)
            return True

    def close(self, session: Session, why: str) -> int:
        """Closes ``session``: no request finds it any more. Returns how many of its jobs
        are going: 0, free it now; else it is freed when the last one ends (:meth:`release`)."""
        with self._lock:
            self._sessions.pop(session.id, None)
            if session.jobs:
                session.closing = why
            return len(session.jobs)

    def release(self, session: Session, job_id: str) -> bool:
        """Job ``job_id`` ended; ``True`` if ``session`` was closed and is to be freed now."""
        with self._lock:
            if job_id not in session.jobs:
                return False  # released already
            session.jobs.discard(job_id)
            session.last_seen = time.monotonic()  # an open session's TTL counts from here
            return session.closing is not None and not session.jobs


# Who may bring a freed id back: the principal of its session, or (a deleted named
# state) any caller that may submit to its namespace.
_RetiredOwner = Principal | str
_MAX_RETIRED = 100_000


class StateStore:
    """id -> resident ``State`` and its :class:`Meta`, and the byte ``ledger`` of them all
    (kept here, by the methods that add, commit, name and drop states: one place)."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        self._states: dict[str, State] = {}
        self._meta: dict[str, Meta] = {}
        self._retired: OrderedDict[str, _RetiredOwner] = OrderedDict()
        self._lock = threading.Lock()

    def may_create(self, state_id: str, session: Session) -> bool:
        """May ``session`` bring a new state with this id into the store?

        Never for a resident id (whoever owns it: that would be an overwrite);
        for a retired one, only its last owner (see ``_RetiredOwner``).
        """
        if state_id in self._states:
            return False
        owner = self._retired.get(state_id)
        if owner is None:
            return True
        if isinstance(owner, Principal):
            return owner == session.principal
        return session.principal.can(owner, "submit")

    def _retire(self, state_id: str, owner: _RetiredOwner) -> None:
        self._retired[state_id] = owner
        self._retired.move_to_end(state_id)
        while len(self._retired) > _MAX_RETIRED:
            self._retired.popitem(last=False)

    def get(self, state_id: str, session: Session) -> State | None:
        """The state if it exists and ``session`` may see it."""
        state = self._states.get(state_id)
        meta = self._meta.get(state_id)
        if state is None or meta is None:
            return None
        if meta.owner == session.id:
            return state
        if meta.namespace is not None and session.principal.can(meta.namespace, "read"):
            return state
        return None

    def meta(self, state_id: str) -> Meta | None:
        return self._meta.get(state_id)

    def by_id(self, state_id: str) -> State | None:
        return self._states.get(state_id)

    def add(self, state: State, session: Session) -> None:
        """A new anonymous state of ``session`` (version 1: its first value)."""
        with self._lock:
            assert state.id not in self._states, "an id has one owner: check may_create"
            self._retired.pop(state.id, None)
            self._states[state.id] = state
            self._meta[state.id] = Meta(session.id, version=1, writer=session.writer,
                                        updated=time.time())
            session.states.add(state.id)
            self.ledger.record(state.id, charged_namespace(session.principal), session.id,
                               state._value)

    def add_named(self, state: State, meta: Meta) -> None:
        with self._lock:
            self._states[state.id] = state
            self._meta[state.id] = meta
            self.ledger.record(state.id, meta.namespace or "", None, state._value)

    def name(self, state_id: str, namespace: str, name: str, session: Session) -> Meta:
        """Moves a state into ``namespace`` under ``name`` (it outlives the session)."""
        with self._lock:
            meta = self._meta[state_id]
            meta.owner, meta.namespace, meta.name = "", namespace, name
            session.states.discard(state_id)
            self.ledger.move(state_id, namespace)
            return meta

    def bump(self, ids: list[str], writer: str) -> dict[str, int]:
        """Records a commit of each state in ``ids`` (its new value installed): returns their
        new versions, and re-measures them in the ledger (a commit can resize a state)."""
        now = time.time()
        out = {}
        with self._lock:
            for state_id in ids:
                meta = self._meta.get(state_id)
                if meta is not None:
                    meta.version += 1
                    meta.writer, meta.updated = writer, now
                    out[state_id] = meta.version
            self.ledger.measure((i, self._states[i]._value) for i in out)
        return out

    def remove(self, ids: list[str]) -> None:
        """Drops named states (deleted, or replaced by a new put of their object)."""
        with self._lock:
            for state_id in ids:
                self._states.pop(state_id, None)
                meta = self._meta.pop(state_id, None)
                if meta is not None and meta.namespace is not None:
                    self._retire(state_id, meta.namespace)
            self.ledger.drop(ids)

    def free(self, session: Session) -> list[str]:
        """Drops every anonymous state ``session`` owns; returns their ids."""
        with self._lock:
            ids = [i for i in session.states if self._meta.get(i, Meta("")).owner == session.id]
            for i in ids:
                self._states.pop(i, None)
                self._meta.pop(i, None)
                self._retire(i, session.principal)
            self.ledger.drop(ids)
            session.states.clear()
        return ids

    def dirty(self) -> list[str]:
        """Named states whose newest version is not on disk yet."""
        with self._lock:
            return [i for i, m in self._meta.items()
                    if m.namespace is not None and m.version > m.durable]

    def nbytes(self, namespace: str | None = None) -> int:
        with self._lock:
            states = [s for i, s in self._states.items()
                      if namespace is None or self._meta[i].namespace == namespace]
        return sum(state_nbytes(s) for s in states)

    def states_with_meta(self) -> list[tuple[State, Meta]]:
        """Every resident state with what the store knows of it (a copy of the lists)."""
        with self._lock:
            return [(s, self._meta[i]) for i, s in self._states.items()]

    def __len__(self) -> int:
        return len(self._states)

    def resident(self) -> list[tuple[str, str, Any]]:
        """``(id, label, value)`` of every resident state, the label naming it for messages
        (``team/net:w`` for a named state, ``anonymous state 1a2b3c4d`` otherwise)."""
        with self._lock:
            found = [(i, s, self._meta.get(i)) for i, s in self._states.items()]
        return [(i, _label(i, meta), s._value) for i, s, meta in found]


def _label(state_id: str, meta: Meta | None) -> str:
    if meta is not None and meta.namespace is not None:
        return f"{meta.namespace}/{meta.name}"
    return f"anonymous state {state_id[:8]}"
