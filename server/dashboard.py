"""What the dashboard shows: one snapshot of the box, as one caller may see it.

``snapshot`` gathers, from what the server already holds (nothing here asks a device to
do work or reads a file): the devices with the memory they use, a short memory history;
the bytes resident per namespace (the byte ledger) and its quota; the sessions; the calls
running and queued per namespace; the recent calls; the jobs with their progress; the
compile-cache figures.
A caller sees the namespaces its token may read: the operator sees everything, a
namespace token its own namespace (devices are shown to every caller, without what other
namespaces keep on them).

``DashboardLogins`` holds the browser logins: ``/dashboard?token=...`` trades a valid token
for a random cookie value once, as Jupyter does, so the token leaves the address bar and
the page's scripts never see it (the cookie is HttpOnly).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any

import jax

from statehost.server.admission import memory_stats

if TYPE_CHECKING:
    from statehost.server.auth import Principal
    from statehost.server.history import CallHistory
    from statehost.server.jobs import JobTable
    from statehost.server.runtime import Runtime

__all__ = ["DashboardLogins", "MemoryHistory", "snapshot"]

#: How many recent calls a snapshot carries (the history keeps more; /v1/dashboard?recent=).
RECENT = 20
#: Most sessions listed one by one in a snapshot (the rest are counted), so that a page's
#: refresh stays small on a busy box.
MAX_SESSIONS = 50


class DashboardLogins:
    """Cookie value -> principal, for browsers that logged in with a token.

    Arguments:
        ttl: seconds a login lasts.
        size: most logins kept; the oldest is forgotten past it.
    """

    def __init__(self, ttl: float = 12 * 3600.0, size: int = 1000):
        self.ttl = ttl
        self.size = size
        self._logins: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, principal: Principal) -> str:
        """A new cookie value for ``principal``."""
        key = secrets.token_urlsafe(32)
        with self._lock:
            self._logins[key] = (principal, time.monotonic() + self.ttl)
            while len(self._logins) > self.size:
                self._logins.popitem(last=False)
        return key

    def principal(self, key: str | None) -> Principal | None:
        """The principal of a live login, or ``None``."""
        if not key:
            return None
        with self._lock:
            found = self._logins.get(key)
            if found is None:
                return None
            if found[1] < time.monotonic():
                del self._logins[key]
                return None
            return found[0]


class MemoryHistory:
    """Device memory in use, one sample per device at most every ``every`` seconds."""

    def __init__(self, samples: int = 120, every: float = 1.0):
        self.every = every
        self._samples: deque[tuple[float, dict[str, int]]] = deque(maxlen=samples)
        self._lock = threading.Lock()

    def sample(self, used: dict[str, int], now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            if self._samples and now - self._samples[-1][0] < self.every:
                return
            self._samples.append((now, dict(used)))

    def series(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"t": round(t, 3), "used": used} for t, used in self._samples]


def _compiles(rt: Runtime) -> dict[str, int]:
    """Programs built since start, by where they came from (fresh, shared, persistent)."""
    found = {}
    for metric in rt.metrics.compiles.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                found[sample.labels.get("source", "")] = int(sample.value)
    return found


def snapshot(rt: Runtime, jobs: JobTable, history: CallHistory, memory: MemoryHistory,
             principal: Principal, recent: int = RECENT) -> dict[str, Any]:
    """The dashboard's view of the box for ``principal`` (see the module docstring)."""
    def visible(namespace: str | None) -> bool:
        # The operator's own sessions (namespace None) are the operator's business.
        if namespace is None:
            return principal.namespace is None
        return principal.can(namespace, "read")

    ledger = rt.store.ledger  # exact resident bytes (server/ledger.py)
    per_device = ledger.total().by_device
    usage = ledger.by_namespace()
    devices, used = [], {}
    for d in jax.devices():
        stats = memory_stats(d)  # {} where the platform reports none (CPU)
        in_use, limit = stats.get("bytes_in_use"), stats.get("bytes_limit")
        resident = per_device.get(f"{d.platform}:{d.id}", 0)
        used[str(d.id)] = in_use if in_use is not None else resident
        devices.append({"id": d.id, "platform": d.platform, "kind": d.device_kind,
                        "bytes_in_use": in_use, "bytes_limit": limit,
                        "resident_bytes": resident if principal.namespace is None else None})
    memory.sample(used)

    durabilities = rt.registry.db.namespaces()
    namespaces = []
    for name in sorted(set(durabilities) | set(usage)):
        if not visible(name):  # the operator's sessions are charged to "default"
            continue
        held = usage.get(name)
        quota = rt.quotas.of(name)
        namespaces.append({
            "name": name, "durability": str(durabilities.get(name, rt.settings.durability)),
            "resident_bytes": 0 if held is None else held.bytes,
            "named_bytes": 0 if held is None else held.named_bytes,
            "session_bytes": 0 if held is None else held.session_bytes,
            "max_bytes": quota.max_bytes, "max_bytes_per_device": quota.max_bytes_per_device})
    sessions = [s for s in rt.sessions.all() if visible(s.principal.namespace)]
    now = time.monotonic()
    calls = [c for c in rt.scheduler.calls if visible(
        None if c.session is None else c.session.principal.namespace)
        and c.session is not None]
    by_namespace: dict[str, dict[str, int]] = {}
    for c in calls:
        assert c.session is not None
        entry = by_namespace.setdefault(c.session.principal.namespace or "(operator)",
                                        {"queued": 0, "running": 0})
        key = str(c.status)
        if key in entry:
            entry[key] += 1
    job_list = [j for j in jobs.all() if visible(j.principal.namespace)]
    return {
        "time": time.time(),
        "viewer": {"namespace": principal.namespace, "scope": principal.scope,
                   "label": principal.label},
        "devices": devices,
        "memory_history": memory.series(),
        "namespaces": namespaces,
        "anonymous_bytes": ledger.total().session_bytes if principal.namespace is None
        else None,
        "sessions": {
            "count": len(sessions),
            "shown": [{"id": s.id[:8], "namespace": s.principal.namespace,
                       "client": s.client, "states": len(s.states),
                       "idle_s": round(now - s.last_seen, 1)}
                      for s in sessions[-MAX_SESSIONS:]],
        },
        "calls": {"by_namespace": by_namespace,
                  "current": [c.describe(now) for c in calls[:MAX_SESSIONS]]},
        "recent_calls": history.recent(recent, visible),
        "calls_finished": history.total,
        "jobs": [{"id": j.id, "status": str(j.status), "session": j.session.id[:8],
                  "progress": j.progress(), "cancel_requested": j.cancel_requested}
                 for j in job_list[-MAX_SESSIONS:]],
        "compile_cache": {"functions": len(rt.functions),
                          "capacity": rt.functions.max_entries,
                          "programs": _compiles(rt)},
    }
