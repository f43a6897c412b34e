"""The callable cache: unpickled transforms keyed by the digest of their pickle.

A repeat call with the same pickled callable (same code, same states) reuses
the unpickled ``StatefulMapping`` and with it the core's plan and compile
cache, so it neither unpickles, nor traces, nor compiles again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["CachedFunction", "FunctionCache"]


@dataclass
class CachedFunction:
    transform: Any
    state_ids: frozenset[str]


class FunctionCache:
    """Least-recently-used map from digest to :class:`CachedFunction`."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedFunction] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> CachedFunction | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, entry: CachedFunction) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def evict_states(self, state_ids: Iterable[str]) -> None:
        """Forgets every callable that refers to one of ``state_ids`` (they were freed)."""
        gone = set(state_ids)
        with self._lock:
            for key in [k for k, e in self._entries.items() if e.state_ids & gone]:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
