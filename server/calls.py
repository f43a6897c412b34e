"""The ``Call``: one unit of device work, from the moment a request is accepted to its end.

Every binary request (a call, a push, a pull, a put, a get, an invoke, a JSON
value write, a flush) becomes a ``Call``: it has an id, an owner (the session
and its principal), the states it locks, a status, a deadline and timings. The
scheduler queues calls; cancelling, deadlines, listing what runs (and is stuck),
and (later) jobs and fairness read and change this one object.

Status moves one way::

    queued ──> running ──> committed | failed
       │  <───────┘        (back, before anything ran: its program does not fit in device
       │                    memory now; see ``statehost.server.admission``)
       └─────> cancelled   (only before it started: by request_cancel, or by the
                            scheduler when the deadline passed in the queue)

A *transfer* (``Call.is_transfer``: reading outputs its session keeps, kind ``fetch``,
locking no state) launches no device program: the scheduler runs it on threads of its
own, so reading a result never waits behind other calls' programs for a worker.

A call's *namespace* is the queue the fair scheduler puts it in: its principal's
namespace; ``(operator)`` for operator tokens (which act on every namespace);
``(server)`` for the server's own work (flushes).

A running call cannot be stopped from outside: no API interrupts a launched XLA
executable (openxla/xla#16801), and a Python thread cannot be killed. Cancelling a
running call (or its deadline passing) sets a flag that work running in steps (a
server-side loop) reads between steps, through :meth:`Call.should_stop`; a single
device program runs to its end, and the call is reported as "running, cancel
requested" meanwhile.
"""

from __future__ import annotations

import enum
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from statehost.server.errors import CallCancelledError

if TYPE_CHECKING:
    from statehost.server.history import CallHistory
    from statehost.server.store import Session

__all__ = ["OPERATOR_QUEUE", "SERVER_QUEUE", "TRANSFER_KINDS", "Call", "CallCancelled",
           "CallStatus", "CallTable"]

#: The fair scheduler's queue of calls whose principal acts on every namespace (operator
#: tokens), and of the server's own work. Parentheses: no namespace name has them.
OPERATOR_QUEUE = "(operator)"
SERVER_QUEUE = "(server)"

#: The kinds of call that only copy arrays a session keeps to the host (the call stream's
#: fetch of a ``RemoteArray``): with no state to lock, they are transfers.
TRANSFER_KINDS = frozenset({"fetch"})

_MSG_BAD_TIMEOUT = (
    "Call(timeout={timeout!r}): a timeout is the seconds a call may take from its creation, "
    "a number > 0 (math.inf: no deadline at all; None: the server's --call-timeout)."
)

#: The exception a call cancelled before it started raises in place of its result (an
#: ``ApiError``, so a request whose call was cancelled answers 409 with what happened).
CallCancelled = CallCancelledError


class CallStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMMITTED = "committed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class Call:
    """One request's device work: ``work(call)`` runs on a worker holding ``keys``' locks.

    Attributes:
        kind: what it does (``call``, ``push``, ``pull``, ``put``, ``get``, ``invoke``, ...).
        session: the owner (``None`` for server work such as flushes).
        keys: the state ids whose locks it takes, in sorted order.
        id: the client's call id when it sent one, else a fresh one.
        timeout: seconds the call may take from its creation, as asked for: ``None`` lets
            the scheduler apply the server's default (``--call-timeout``), ``math.inf``
            means no deadline.
        deadline: the ``time.monotonic()`` past which it is not started any more, and
            after which a running call should stop at its next step; ``None``: none.
        cancel_requested: someone asked to cancel it (see :meth:`request_cancel`).
        error: why it failed or was dropped (a ``CallTimeoutError``, a
            ``CallCancelledError``, the work's exception).
    """

    kind: str
    session: Session | None
    keys: tuple[str, ...]
    work: Callable[[Call], Any]
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    timeout: float | None = None
    status: CallStatus = CallStatus.QUEUED
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    error: BaseException | None = None
    deadline: float | None = field(default=None, init=False)
    cancel_requested: bool = field(default=False, init=False)
    # What the work reports of itself for the call history (compiled, bytes_in, bytes_out).
    notes: dict[str, Any] = field(default_factory=dict, init=False)
    # Status changes happen on the event loop (cancel) and on workers (start, end).
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # Set by the scheduler while the call is queued there: told when a cancel took effect.
    _on_cancel: Callable[[Call, bool], None] | None = field(default=None, init=False,
                                                            repr=False)
    # Set by the scheduler: arrival order, and (admission) the estimated device memory of
    # its program and why it does not fit now.
    seq: int = field(default=0, init=False, repr=False)
    demand: Any = field(default=None, init=False, repr=False)
    short_of_memory: Any = field(default=None, init=False, repr=False)
    # Programs compiled by its attempts that were sent back for memory (counted once it runs).
    compiled_before: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.keys = tuple(sorted(set(self.keys)))
        if self.timeout is not None:
            if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float) \
                    or not self.timeout > 0:
                raise ValueError(_MSG_BAD_TIMEOUT.format(timeout=self.timeout))
            if not math.isinf(self.timeout):
                self.deadline = self.created + self.timeout

    @property
    def principal(self) -> Any:
        return None if self.session is None else self.session.principal

    @property
    def is_transfer(self) -> bool:
        """Whether the call only copies kept outputs to the host (see the module docstring):
        the scheduler runs it without a worker."""
        return self.kind in TRANSFER_KINDS and not self.keys

    @property
    def namespace(self) -> str:
        """The fair scheduler's queue of this call (see the module docstring)."""
        if self.session is None:
            return SERVER_QUEUE
        namespace = getattr(self.session.principal, "namespace", None)
        return OPERATOR_QUEUE if namespace is None else namespace

    # -- deadline and cancellation ------------------------------------------------------
    def apply_default_timeout(self, seconds: float) -> None:
        """Gives a call created without a timeout the server's default (0: none)."""
        if self.timeout is None and self.deadline is None and 0 < seconds < math.inf:
            self.deadline = self.created + seconds

    def is_past_deadline(self, now: float | None = None) -> bool:
        return self.deadline is not None and (time.monotonic() if now is None else now) \
            >= self.deadline

    def should_stop(self) -> bool:
        """Whether work running in steps should stop before its next step: the call was
        cancelled, or its deadline has passed. A single device program cannot be
        interrupted (openxla/xla#16801), so this is checked between device programs."""
        return self.cancel_requested or self.status is CallStatus.CANCELLED \
            or self.is_past_deadline()

    def request_cancel(self) -> CallStatus:
        """Cancels the call: a queued one becomes ``cancelled`` and never starts; a running
        one keeps running with ``cancel_requested`` set, which work that runs in steps reads
        (:meth:`should_stop`) between steps. A running device program cannot be interrupted
        (no API stops a launched XLA executable: openxla/xla#16801), so a call that is one
        device program finishes (and commits) anyway. A finished call is left as it is.

        Returns:
            The status after the request: ``cancelled``, ``running`` (with
            ``cancel_requested``), or the finished call's ``committed`` / ``failed``.

        Example:
            >>> call = Call("call", None, (), lambda call: None)
            >>> call.request_cancel(), call.cancel_requested
            (<CallStatus.CANCELLED: 'cancelled'>, True)
        """
        with self._lock:
            status = self.status
            changed = status is CallStatus.QUEUED or (
                status is CallStatus.RUNNING and not self.cancel_requested)
            if status is CallStatus.QUEUED:
                self.status = CallStatus.CANCELLED
                self.error = CallCancelledError(_cancelled_message(self))
            if changed:
                self.cancel_requested = True
            status, hook = self.status, self._on_cancel
        if changed and hook is not None:
            hook(self, status is CallStatus.CANCELLED)
        return status

    def cancel(self) -> bool:
        """Cancels the call if it has not started; returns whether it did (a running call
        is left alone: see :meth:`request_cancel` to ask it to stop)."""
        with self._lock:
            if self.status is not CallStatus.QUEUED:
                return False
        return self.request_cancel() is CallStatus.CANCELLED

    # -- used by the scheduler ------------------------------------------------------------
    def begin(self, now: float) -> bool:
        """queued -> running, unless it was cancelled meanwhile; returns whether it started."""
        with self._lock:
            if self.status is not CallStatus.QUEUED:
                return False
            self.status, self.started = CallStatus.RUNNING, now
            return True

    def requeue(self) -> bool:
        """running -> queued, before anything ran (it did not fit in device memory now);
        returns whether it did. One whose cancel was requested meanwhile becomes
        ``cancelled`` instead (it never ran)."""
        with self._lock:
            if self.status is not CallStatus.RUNNING:
                return False
            if self.cancel_requested:
                self.status = CallStatus.CANCELLED
                self.error = CallCancelledError(_cancelled_message(self))
                return False
            self.status, self.started = CallStatus.QUEUED, None
            return True

    def drop(self, error: BaseException) -> bool:
        """queued -> cancelled with ``error`` (its deadline passed); whether it was queued."""
        with self._lock:
            if self.status is not CallStatus.QUEUED:
                return False
            self.status, self.error = CallStatus.CANCELLED, error
            return True

    # -- reporting --------------------------------------------------------------------
    def running_s(self, now: float | None = None) -> float | None:
        if self.started is None:
            return None
        return (self.finished or (time.monotonic() if now is None else now)) - self.started

    def describe(self, now: float | None = None) -> dict[str, Any]:
        """The call as ``/v1/info`` and the cancel route show it. A running call past its
        deadline shows ``cancel_requested`` true: it is asked to stop, as if cancelled."""
        now = time.monotonic() if now is None else now
        running = self.running_s(now)
        return {"id": self.id, "kind": self.kind, "status": str(self.status),
                "session": None if self.session is None else self.session.id[:8],
                "states": len(self.keys), "age_s": round(now - self.created, 3),
                "running_s": None if running is None else round(running, 3),
                "cancel_requested": self.cancel_requested or (
                    self.status is CallStatus.RUNNING and self.is_past_deadline(now)),
                "deadline_in_s": None if self.deadline is None else round(
                    self.deadline - now, 3)}


def _cancelled_message(call: Call) -> str:
    return (f"{call.kind} {call.id}: cancelled before it started (POST /v1/calls/{call.id}/"
            "cancel, or the server stopped waiting for it); nothing was applied.")


class CallTable:
    """The calls queued or running now (finished ones are dropped, into ``history``)."""

    def __init__(self, history: CallHistory | None = None) -> None:
        self._calls: dict[int, Call] = {}
        self._lock = threading.Lock()
        self.history = history  # told of every call the table forgets (it has ended)

    def add(self, call: Call) -> None:
        with self._lock:
            self._calls[id(call)] = call

    def discard(self, call: Call) -> None:
        with self._lock:
            known = self._calls.pop(id(call), None) is not None
        if known and self.history is not None:
            self.history.record(call)

    def of(self, session: Session) -> list[Call]:
        with self._lock:
            return [c for c in self._calls.values() if c.session is session]

    def find(self, call_id: str, principal: Any) -> Call | None:
        """The queued or running call ``call_id`` of one of ``principal``'s sessions; server
        work and other principals' calls are never found (they look like finished ones)."""
        with self._lock:
            found = [c for c in self._calls.values()
                     if c.id == call_id and c.session is not None and c.principal == principal]
        # A client that re-sends an id finds the running (or else the oldest) one.
        found.sort(key=lambda c: (c.status is not CallStatus.RUNNING, c.created))
        return found[0] if found else None

    def __iter__(self) -> Iterator[Call]:
        with self._lock:
            return iter(list(self._calls.values()))

    def count(self, status: CallStatus) -> int:
        with self._lock:
            return sum(c.status is status for c in self._calls.values())
