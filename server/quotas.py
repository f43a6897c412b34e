"""Per-namespace quotas, and the one place that refuses what would exceed them (429).

A namespace may limit, each on its own (``statehost namespace set``, ``PUT
/v1/namespaces/{ns}``, stored with the namespace in SQLite):

- ``max_bytes``: the bytes its states hold on all devices together (the ledger's
  figure: a state replicated on 8 devices counts 8 times);
- ``max_bytes_per_device``: the bytes they hold on any one device;
- ``max_sessions``: its open sessions;
- ``max_queued``: its calls waiting in the scheduler's queue.

A quota the namespace does not set is the server's default (``STATEHOST_DEFAULT_MAX_*``,
``statehost serve --default-max-*``); with neither, there is no limit. What is charged
to a namespace: its named states, and the sessions (with their anonymous states and
calls) opened with its tokens; an operator token's sessions are charged to
``ledger.OPERATOR_NAMESPACE``.

Bytes are checked twice, and nothing moves before the first check: when uploads arrive
(:meth:`Quotas.check_bytes`, from their host sizes, before they are placed on a
device) and at commit (:meth:`Quotas.admitting`, from the exact sizes of the values the
commit installs: a call can grow a state). A request that does not grow a namespace's
use is never refused, so a namespace over a lowered quota can still shrink.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from statehost.server.errors import QuotaExceededError
from statehost.server.ledger import PerDevice, add, charged_namespace
from statehost.server.persistence.database import QUOTA_FIELDS

if TYPE_CHECKING:
    from statehost.server.auth import Principal
    from statehost.server.calls import Call
    from statehost.server.persistence import Persistence
    from statehost.server.scheduler import Scheduler
    from statehost.server.settings import Settings
    from statehost.server.store import Session, SessionTable, StateStore

__all__ = ["Charge", "Quota", "Quotas", "format_size", "host_bytes"]

_MSG_BYTES = (
    "{where}: refused, nothing was changed: namespace {namespace!r} would exceed its quota "
    "{quota}={limit_h}{on}. It holds {used_h}{there}, and {what} {requested_h} more. "
    "Fix: free space in {namespace!r} (its largest states: {largest}): delete named objects "
    "with client.delete('{namespace}/NAME'), or close sessions (their anonymous states are "
    "freed with them); or ask an operator to raise the quota: statehost namespace set "
    "{namespace} --{flag} SIZE."
)
_MSG_SESSIONS = (
    "{where}: refused, no session was opened: namespace {namespace!r} has {used} open "
    "session(s), its quota max_sessions={limit}. Fix: close a session you no longer use "
    "(client.close(), DELETE /v1/sessions/{{id}}; idle ones end after {ttl:g} s), or ask an "
    "operator to raise the quota: statehost namespace set {namespace} --max-sessions N."
)
_MSG_QUEUED = (
    "{where}: refused, the call was not queued: namespace {namespace!r} has {used} call(s) "
    "waiting in the server's queue, its quota max_queued={limit}. Fix: wait for some of them "
    "to finish (client.sync()), then send it again; or ask an operator to raise the quota: "
    "statehost namespace set {namespace} --max-queued N."
)


def format_size(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"`` (bytes below 1 KiB as ``"512 B"``)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            break
        value /= 1024
    else:  # pragma: no cover
        raise AssertionError(n)
    return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"


def host_bytes(value: Any) -> int:
    """The bytes of a host value's array leaves (an upload, before it is placed)."""
    return sum(int(getattr(leaf, "nbytes", None) or np.asarray(leaf).nbytes)
               for leaf in jax.tree_util.tree_leaves(value))


@dataclass(frozen=True)
class Quota:
    """A namespace's limits in effect (None: none)."""

    max_bytes: int | None = None
    max_bytes_per_device: int | None = None
    max_sessions: int | None = None
    max_queued: int | None = None

    @property
    def limits_bytes(self) -> bool:
        return self.max_bytes is not None or self.max_bytes_per_device is not None

    def describe(self) -> dict[str, int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


assert tuple(f.name for f in fields(Quota)) == QUOTA_FIELDS


@dataclass(frozen=True)
class Charge:
    """Where a transaction's new states are charged, and what else its request moves.

    A put charges its uploads to the put's namespace (not the uploading session's), and
    ``extra`` adds what naming moves there (resident states it names) or frees (states of
    the object it replaces), per device.
    """

    namespace: str
    extra: PerDevice = field(default_factory=dict)


class Quotas:
    """The quotas of one server's namespaces, and their checks."""

    def __init__(self, settings: Settings, persistence: Persistence, store: StateStore,
                 sessions: SessionTable, scheduler: Scheduler):
        self.settings = settings
        self.persistence = persistence
        self.store = store
        self.sessions = sessions
        self.scheduler = scheduler
        self.defaults = Quota(settings.default_max_bytes, settings.default_max_bytes_per_device,
                              settings.default_max_sessions, settings.default_max_queued)
        # Held from a commit's byte check until its values are installed, so two commits
        # of one namespace cannot both pass the check; taken only where bytes are limited.
        self._commit_lock = threading.Lock()
        self._session_lock = threading.Lock()
        self._bytes_limited: tuple[int, bool] = (-1, False)  # (quotas_changed, any limit)

    # -- what applies -------------------------------------------------------------------
    def of(self, namespace: str) -> Quota:
        own = self.persistence.quotas(namespace)
        return Quota(**{name: own.get(name) if own.get(name) is not None
                        else getattr(self.defaults, name) for name in QUOTA_FIELDS})

    def describe(self, namespace: str) -> dict[str, Any]:
        """The quotas in effect and the namespace's own settings (None: the default)."""
        return {**self.of(namespace).describe(),
                "own": {name: self.persistence.quotas(namespace).get(name)
                        for name in QUOTA_FIELDS}}

    def _any_bytes_limit(self) -> bool:
        """Whether any namespace limits bytes (asked at every commit, so cached until the
        next ``set_quotas``)."""
        changed, limited = self._bytes_limited
        if changed != self.persistence.quotas_changed:
            changed = self.persistence.quotas_changed
            limited = self.defaults.limits_bytes or any(
                self.of(ns).limits_bytes for ns in self.persistence.namespaces())
            self._bytes_limited = (changed, limited)
        return limited

    # -- bytes ------------------------------------------------------------------------------
    def deltas(self, items: Iterable[tuple[str, PerDevice]], session: Session,
               charge: Charge | None) -> dict[str, PerDevice]:
        """What installing these (state id, new bytes per device) changes, per namespace."""
        out: dict[str, PerDevice] = {}
        if charge is not None and charge.extra:
            out[charge.namespace] = dict(charge.extra)
        ledger = self.store.ledger
        for state_id, new in items:
            entry = ledger.get(state_id)
            if charge is not None:
                target = charge.namespace
            elif entry is not None:
                target = entry.namespace
            else:
                target = charged_namespace(session.principal)
            old = entry.per_device if entry is not None and entry.namespace == target else {}
            out[target] = add(add(out.get(target, {}), new), old, -1)
        return out

    def check_bytes(self, deltas: dict[str, PerDevice], where: str,
                    what: str = "this request needs") -> None:
        """A 429 if one namespace's growth in ``deltas`` takes it past a byte quota
        (``what`` says what grows it, in the message)."""
        for namespace, delta in deltas.items():
            quota = self.of(namespace)
            if not quota.limits_bytes:
                continue
            usage = self.store.ledger.namespace(namespace)
            grow = sum(delta.values())
            if quota.max_bytes is not None and grow > 0 and \
                    usage.bytes + grow > quota.max_bytes:
                raise self._bytes_error(where, namespace, "max_bytes", quota.max_bytes,
                                        usage.bytes, grow, None, what)
            if quota.max_bytes_per_device is not None:
                for device, n in sorted(delta.items()):
                    held = usage.by_device.get(device, 0)
                    if device != "host" and n > 0 and held + n > quota.max_bytes_per_device:
                        raise self._bytes_error(where, namespace, "max_bytes_per_device",
                                                quota.max_bytes_per_device, held, n, device,
                                                what)

    @contextlib.contextmanager
    def admitting(self, deltas: Callable[[], dict[str, PerDevice]], where: str
                  ) -> Iterator[None]:
        """Checks a commit's exact ``deltas()`` and holds the check until the body (which
        installs the values) is done; free when no namespace limits bytes."""
        if not self._any_bytes_limit():
            yield
            return
        with self._commit_lock:
            self.check_bytes(deltas(), where, "the values this call commits need")
            yield

    def _bytes_error(self, where: str, namespace: str, quota: str, limit: int, used: int,
                     requested: int, device: str | None, what: str) -> QuotaExceededError:
        largest = [{"name": self._state_name(i), "id": i, "bytes": n}
                   for i, n in self.store.ledger.largest(namespace, 3, device)]
        shown = ", ".join(f"{s['name']} ({format_size(s['bytes'])})" for s in largest)
        return QuotaExceededError(
            _MSG_BYTES.format(
                where=where, namespace=namespace, quota=quota,
                limit_h=f"{format_size(limit)} ({limit} bytes)",
                on="" if device is None else " on each device",
                used_h=f"{format_size(used)} ({used} bytes)",
                there="" if device is None else f" on {device}",
                requested_h=f"{format_size(requested)} ({requested} bytes)", what=what,
                largest=shown or "none resident", flag=quota.replace("_", "-")),
            namespace=namespace, quota=quota, limit=limit, used=used, requested=requested,
            device=device, largest=largest)

    def _state_name(self, state_id: str) -> str:
        meta = self.store.meta(state_id)
        if meta is not None and meta.name:
            return f"'{meta.namespace}/{meta.name}'"
        owner = meta.owner[:8] if meta is not None else "?"
        return f"anonymous state {state_id[:8]} of session {owner}"

    # -- sessions and queued calls -------------------------------------------------------
    @contextlib.contextmanager
    def opening_session(self, principal: Principal, where: str) -> Iterator[None]:
        """A 429 if ``principal``'s namespace has ``max_sessions`` open; held while the body
        opens one, so that concurrent opens cannot both pass."""
        namespace = charged_namespace(principal)
        limit = self.of(namespace).max_sessions
        if limit is None:
            yield
            return
        with self._session_lock:
            used = self.sessions_of(namespace)
            if used >= limit:
                raise QuotaExceededError(
                    _MSG_SESSIONS.format(where=where, namespace=namespace, used=used,
                                         limit=limit, ttl=self.settings.session_ttl),
                    namespace=namespace, quota="max_sessions", limit=limit, used=used,
                    requested=1)
            yield

    def sessions_of(self, namespace: str) -> int:
        """Open sessions charged to ``namespace``."""
        return sum(1 for s in self.sessions.all() if charged_namespace(s.principal) == namespace)

    def queued_of(self, namespace: str) -> int:
        """Calls of ``namespace``'s sessions waiting in the scheduler's queue."""
        return sum(1 for c in self.scheduler.queued_calls()
                   if c.session is not None and charged_namespace(c.session.principal)
                   == namespace)

    def check_queued(self, call: Call, where: str) -> None:
        """A 429 if ``call``'s namespace already has ``max_queued`` calls waiting."""
        if call.session is None:  # the server's own work
            return
        namespace = charged_namespace(call.session.principal)
        limit = self.of(namespace).max_queued
        if limit is None:
            return
        used = self.queued_of(namespace)
        if used >= limit:
            raise QuotaExceededError(
                _MSG_QUEUED.format(where=where, namespace=namespace, used=used, limit=limit),
                namespace=namespace, quota="max_queued", limit=limit, used=used, requested=1)
