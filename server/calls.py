"""The ``Call``: one unit of device work, from the moment a request is accepted to its end.

Every binary request (a call, a push, a pull, a put, a get, an invoke, a JSON
value write, a flush) becomes a ``Call``: it has an id, an owner (the session
and its principal), the states it locks, a status and timings. The scheduler
queues calls; cancelling a queued call, listing what runs, and (later) jobs,
deadlines and fairness read and change this one object.

Status moves one way::

    queued ──> running ──> committed | failed
       └─────> cancelled   (only before it started: a running device program
                            cannot be interrupted, openxla/xla#16801)
"""

from __future__ import annotations

import enum
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from statehost.server.store import Session

__all__ = ["Call", "CallCancelled", "CallStatus", "CallTable"]


class CallStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMMITTED = "committed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class CallCancelled(Exception):
    """Raised in place of a call's result when it was cancelled before it started."""


@dataclass(eq=False)
class Call:
    """One request's device work: ``work(call)`` runs on a worker holding ``keys``' locks.

    Attributes:
        kind: what it does (``call``, ``push``, ``pull``, ``put``, ``get``, ``invoke``, ...).
        session: the owner (``None`` for server work such as flushes).
        keys: the state ids whose locks it takes, in sorted order.
        id: the client's call id when it sent one, else a fresh one.
    """

    kind: str
    session: Session | None
    keys: tuple[str, ...]
    work: Callable[[Call], Any]
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    status: CallStatus = CallStatus.QUEUED
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.keys = tuple(sorted(set(self.keys)))

    @property
    def principal(self) -> Any:
        return None if self.session is None else self.session.principal

    def cancel(self) -> bool:
        """Cancels the call if it has not started; returns whether it did."""
        if self.status is CallStatus.QUEUED:
            self.status = CallStatus.CANCELLED
            return True
        return False

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"id": self.id, "kind": self.kind, "status": str(self.status),
                "session": None if self.session is None else self.session.id[:8],
                "states": len(self.keys), "age_s": round(now - self.created, 3),
                "running_s": None if self.started is None else round(
                    (self.finished or now) - self.started, 3)}


class CallTable:
    """The calls queued or running now (finished ones are dropped)."""

    def __init__(self) -> None:
        self._calls: dict[int, Call] = {}
        self._lock = threading.Lock()

    def add(self, call: Call) -> None:
        with self._lock:
            self._calls[id(call)] = call

    def discard(self, call: Call) -> None:
        with self._lock:
            self._calls.pop(id(call), None)

    def of(self, session: Session) -> list[Call]:
        with self._lock:
            return [c for c in self._calls.values() if c.session is session]

    def __iter__(self) -> Iterable[Call]:
        with self._lock:
            return iter(list(self._calls.values()))

    def count(self, status: CallStatus) -> int:
        with self._lock:
            return sum(c.status is status for c in self._calls.values())
