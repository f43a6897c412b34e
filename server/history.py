"""``CallHistory``: the last finished calls, bounded, for the dashboard's "recent calls".

The ``CallTable`` forgets a call when it ends; before it does, it hands the call here,
and what is kept is a small summary (no arrays, no request), so the history's size is
bounded by its length whatever the calls moved.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from statehost.server.calls import Call

__all__ = ["CallHistory"]


class CallHistory:
    """The ``size`` most recent finished calls, newest last.

    Arguments:
        size: how many are kept (1,000 by default); older ones are forgotten.
    """

    def __init__(self, size: int = 1000):
        if size < 1:
            raise ValueError(f"CallHistory(size={size!r}): keep at least one call.")
        self._calls: deque[dict[str, Any]] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.total = 0  # finished calls ever recorded, also the ones forgotten

    def record(self, call: Call) -> None:
        """Keeps a summary of ``call``, which has just finished (or was dropped)."""
        session = call.session
        now = time.monotonic()
        queued = (call.started or call.finished or now) - call.created
        entry = {
            "id": call.id, "kind": call.kind, "outcome": str(call.status),
            "namespace": _namespace(session), "session": None if session is None
            else session.id[:8], "queued_s": round(queued, 4),
            "running_s": None if call.started is None else round(
                (call.finished or now) - call.started, 4),
            "error": None if call.error is None else type(call.error).__name__,
            "finished": time.time(),
            **call.notes,
        }
        with self._lock:
            self._calls.append(entry)
            self.total += 1

    def recent(self, count: int, visible: Any = None) -> list[dict[str, Any]]:
        """The ``count`` newest summaries, newest first, that ``visible(namespace)`` allows
        (every one when ``visible`` is ``None``)."""
        with self._lock:
            calls = list(self._calls)
        out = []
        for entry in reversed(calls):
            if visible is None or visible(entry["namespace"]):
                out.append(entry)
                if len(out) == count:
                    break
        return out

    def __len__(self) -> int:
        return len(self._calls)


def _namespace(session: Any) -> str | None:
    """The namespace a session's principal acts on (``None``: the operator, every one)."""
    return None if session is None else session.principal.namespace
