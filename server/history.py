"""``CallHistory``: the last finished calls, bounded, for the dashboard's "recent calls"
and ``GET /v1/calls`` (a caller's own calls, with how long each waited and ran).

The ``CallTable`` forgets a call when it ends; before it does, it hands the call here,
and what is kept is a small summary (no arrays, no request), so the history's size is
bounded by its length whatever the calls moved. Each summary remembers the principal
whose session made the call, so a caller finds its own calls and no one else's.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from statehost.server.calls import CallStatus

if TYPE_CHECKING:
    from statehost.server.calls import Call

__all__ = ["CallHistory", "summary"]


class CallHistory:
    """The ``size`` most recent finished calls, newest last.

    Arguments:
        size: how many are kept (1,000 by default); older ones are forgotten.
    """

    def __init__(self, size: int = 1000):
        if size < 1:
            raise ValueError(f"CallHistory(size={size!r}): keep at least one call.")
        # (the principal whose session made the call, its summary), oldest first.
        self._calls: deque[tuple[Any, dict[str, Any]]] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.total = 0  # finished calls ever recorded, also the ones forgotten

    def record(self, call: Call) -> None:
        """Keeps a summary of ``call``, which has just finished (or was dropped)."""
        session = call.session
        entry = summary(call)
        with self._lock:
            self._calls.append((None if session is None else session.principal, entry))
            self.total += 1

    def recent(self, count: int, visible: Any = None) -> list[dict[str, Any]]:
        """The ``count`` newest summaries, newest first, that ``visible(namespace)`` allows
        (every one when ``visible`` is ``None``)."""
        with self._lock:
            calls = list(self._calls)
        out = []
        for _, entry in reversed(calls):
            if visible is None or visible(entry["namespace"]):
                out.append(entry)
                if len(out) == count:
                    break
        return out

    def of(self, principal: Any, count: int, call_id: str | None = None
           ) -> list[dict[str, Any]]:
        """The ``count`` newest summaries of calls made by ``principal``'s sessions, newest
        first (only those with id ``call_id`` when given); server work is nobody's."""
        with self._lock:
            calls = list(self._calls)
        out = []
        for owner, entry in reversed(calls):
            if owner is not None and owner == principal and (
                    call_id is None or entry["id"] == call_id):
                out.append(entry)
                if len(out) == count:
                    break
        return out

    def __len__(self) -> int:
        return len(self._calls)


def summary(call: Call, now: float | None = None) -> dict[str, Any]:
    """What the history keeps of a call, also of one still queued or running (its waits
    and run so far): id, kind, outcome (its status), namespace, session (id prefix),
    ``queued_s`` (from its creation to its start, or to now while it waits), ``running_s``
    (``None`` until it starts), the error's type, and what its work noted of itself."""
    session = call.session
    now = time.monotonic() if now is None else now
    queued = (call.started or call.finished or now) - call.created
    return {
        "id": call.id, "kind": call.kind, "outcome": str(call.status),
        "namespace": _namespace(session),
        "session": None if session is None else session.id[:8],
        "queued_s": round(queued, 4),
        "running_s": None if call.started is None else round(
            (call.finished or now) - call.started, 4),
        "error": None if call.error is None else type(call.error).__name__,
        "finished": None if call.status in (CallStatus.QUEUED, CallStatus.RUNNING)
        else time.time(),
        **call.notes,
    }


def _namespace(session: Any) -> str | None:
    """The namespace a session's principal acts on (``None``: the operator, every one)."""
    return None if session is None else session.principal.namespace
