"""The byte ledger: what every resident state occupies on each device, summed per owner.

Each state has one entry: the namespace it is charged to, the session that owns it (an
anonymous state) or none (a named state), and its bytes per device (``"cpu:3"``;
``"host"`` for a leaf that is not a device array). A state replicated on 8 devices
counts on each of them: these are the bytes the devices really hold, which is what
quotas (``quotas.py``) limit.

Who is charged: a named state, its namespace; an anonymous state, the namespace of its
session's principal (a namespace token's namespace), or :data:`OPERATOR_NAMESPACE` for
a session opened with an operator token (which acts on every namespace).

The store (``store.py``) is the only writer: it records a state when it is added or
reloaded, re-measures it at every commit (a call can change a state's shape or
sharding; an upload replaces its value), moves it when it is named, and drops it when
it is deleted, replaced, or freed with its session. Everything else only reads.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import jax

from statehost.server.auth import Principal

__all__ = ["OPERATOR_NAMESPACE", "Entry", "Ledger", "Usage", "charged_namespace",
           "device_bytes"]

#: The namespace an operator-token session's anonymous states are charged to.
OPERATOR_NAMESPACE = "default"

PerDevice = dict[str, int]


def charged_namespace(principal: Principal) -> str:
    """The namespace a session of ``principal`` is charged to (its anonymous states, its
    sessions and queued calls, for quotas)."""
    return principal.namespace if principal.namespace is not None else OPERATOR_NAMESPACE


def _key(device: Any) -> str:
    return f"{device.platform}:{device.id}"


def device_bytes(value: Any, cache: dict[Any, Any] | None = None) -> PerDevice:
    """The bytes ``value``'s leaves take on each device (a replicated leaf on each).

    ``cache`` keeps each (sharding, shape, dtype)'s answer: working it out costs ~20 us for
    an 8-device array, and every commit re-measures what it wrote.
    """
    out: PerDevice = {}
    for leaf in jax.tree_util.tree_leaves(value):
        if isinstance(leaf, jax.Array):
            key = (leaf.sharding, leaf.shape, leaf.dtype)
            per = cache.get(key) if cache is not None else None
            if per is None:
                per = _array_bytes(leaf)
                if cache is not None:
                    if len(cache) >= _CACHE_SIZE:
                        cache.clear()
                    cache[key] = per
            for device, n in per:
                out[device] = out.get(device, 0) + n
        else:
            n = int(getattr(leaf, "nbytes", 0))
            if n:
                out["host"] = out.get("host", 0) + n
    return out


_CACHE_SIZE = 4096


def _array_bytes(leaf: jax.Array) -> tuple[tuple[str, int], ...]:
    sharding = leaf.sharding
    try:
        shard = math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        per = [(d, shard) for d in sharding.device_set]
    except Exception:  # an uneven sharding: measure each shard
        per = [(s.device, s.data.nbytes) for s in leaf.addressable_shards]
    return tuple((_key(d), int(n)) for d, n in per)


def add(a: PerDevice, b: PerDevice, sign: int = 1) -> PerDevice:
    """``a + sign * b``, per device (zero entries dropped)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + sign * v
        if not out[k]:
            del out[k]
    return out


@dataclass
class Entry:
    namespace: str
    session: str | None  # the owning session's id (anonymous), None for a named state
    per_device: PerDevice

    @property
    def bytes(self) -> int:
        return sum(self.per_device.values())


@dataclass
class Usage:
    """What one namespace, one session or the whole server holds.

    Attributes:
        bytes: on every device together.
        by_device: per device.
        states: how many states.
        named_bytes, session_bytes: of ``bytes``, in named states and in sessions'
            anonymous states.
    """

    bytes: int = 0
    by_device: PerDevice = field(default_factory=dict)
    states: int = 0
    named_bytes: int = 0
    session_bytes: int = 0

    def _count(self, entry: Entry) -> None:
        n = entry.bytes
        self.bytes += n
        self.states += 1
        if entry.session is None:
            self.named_bytes += n
        else:
            self.session_bytes += n
        for k, v in entry.per_device.items():
            self.by_device[k] = self.by_device.get(k, 0) + v

    def describe(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "by_device": dict(sorted(self.by_device.items())),
                "states": self.states, "named_bytes": self.named_bytes,
                "session_bytes": self.session_bytes}


class Ledger:
    """state id -> :class:`Entry`; every sum is computed from the entries under one lock,
    so a reader never sees half of a commit."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._shapes: dict[Any, Any] = {}  # device_bytes' cache

    def measure_value(self, value: Any) -> PerDevice:
        """``device_bytes(value)``, with this ledger's cache."""
        return device_bytes(value, self._shapes)

    # -- written by the store only ---------------------------------------------------
    def record(self, state_id: str, namespace: str, session: str | None, value: Any) -> None:
        entry = Entry(namespace, session, self.measure_value(value))
        with self._lock:
            self._entries[state_id] = entry

    def measure(self, items: Iterable[tuple[str, Any]]) -> None:
        """Re-measures these states' values (after a commit installed them)."""
        sizes = [(i, self.measure_value(v)) for i, v in items]
        with self._lock:
            for state_id, per_device in sizes:
                entry = self._entries.get(state_id)
                if entry is not None:
                    entry.per_device = per_device

    def move(self, state_id: str, namespace: str) -> None:
        """An anonymous state became a named state of ``namespace``."""
        with self._lock:
            entry = self._entries.get(state_id)
            if entry is not None:
                entry.namespace, entry.session = namespace, None

    def drop(self, ids: Iterable[str]) -> None:
        with self._lock:
            for state_id in ids:
                self._entries.pop(state_id, None)

    # -- reading -----------------------------------------------------------------------
    def get(self, state_id: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get(state_id)
            return None if entry is None else Entry(entry.namespace, entry.session,
                                                    dict(entry.per_device))

    def namespace(self, namespace: str) -> Usage:
        usage = Usage()
        with self._lock:
            for entry in self._entries.values():
                if entry.namespace == namespace:
                    usage._count(entry)
        return usage

    def session(self, session_id: str) -> Usage:
        usage = Usage()
        with self._lock:
            for entry in self._entries.values():
                if entry.session == session_id:
                    usage._count(entry)
        return usage

    def total(self) -> Usage:
        usage = Usage()
        with self._lock:
            for entry in self._entries.values():
                usage._count(entry)
        return usage

    def by_namespace(self) -> dict[str, Usage]:
        out: dict[str, Usage] = {}
        with self._lock:
            for entry in self._entries.values():
                out.setdefault(entry.namespace, Usage())._count(entry)
        return out

    def by_session(self) -> dict[str, Usage]:
        out: dict[str, Usage] = {}
        with self._lock:
            for entry in self._entries.values():
                if entry.session is not None:
                    out.setdefault(entry.session, Usage())._count(entry)
        return out

    def largest(self, namespace: str, count: int = 3, device: str | None = None
                ) -> list[tuple[str, int]]:
        """The ids and bytes of ``namespace``'s largest states (on ``device`` if given)."""
        with self._lock:
            sizes = [(i, e.per_device.get(device, 0) if device else e.bytes)
                     for i, e in self._entries.items() if e.namespace == namespace]
        sizes = [s for s in sizes if s[1] > 0]
        return sorted(sizes, key=lambda s: -s[1])[:count]

    def __len__(self) -> int:
        return len(self._entries)
