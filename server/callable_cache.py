"""Shipped callables: unpickling them safely, and the cache of unpickled transforms.

A repeat call with the same pickled callable (same code, same states) reuses
the unpickled ``StatefulMapping`` and with it the core's plan and compile
cache, so it neither unpickles, nor traces, nor compiles again. Entries are
keyed by the owner (a session, or a registered function's name) and the sha256
digest of the pickle, and are evicted when a state they refer to is freed.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from statehost._errors import WireError
from statehost.server.errors import ApiError, PayloadError, ProtocolError
from statehost.transform import StatefulFunction, StatefulMapping
from statehost.wire import Section, StateRef

__all__ = ["CachedFunction", "FunctionCache", "check_digest", "load_transform", "unpickle"]

Transform = StatefulMapping | StatefulFunction

_MSG_MISSING_MODULE = (
    "{where}: unpickling the {what} needs module {module!r}, which the server cannot "
    "import ({exc}). Fix it in one of these ways:\n"
    "  1. install {module!r} in the server's environment;\n"
    "  2. define the code in the notebook or script (__main__), which cloudpickle ships "
    "by value;\n"
    "  3. call cloudpickle.register_pickle_by_value({module}) on the client before the call."
)


def unpickle(section: Section, load_state: Callable[[StateRef], Any] | None, what: str,
             where: str) -> Any:
    """Loads a received section; any failure is the sender's (a 4xx naming the section)."""
    try:
        return section.load(load_state)
    except ApiError:
        raise
    except ModuleNotFoundError as exc:
        raise PayloadError(
            _MSG_MISSING_MODULE.format(where=where, what=what, module=exc.name, exc=exc),
            missing_module=exc.name,
        ) from exc
    except WireError as exc:
        raise ProtocolError(f"{where}: the {what} section: {exc}") from exc
    except BaseException as exc:  # a pickle may raise SystemExit too: still the sender's
        raise PayloadError(
            f"{where}: the {what} section could not be unpickled ({type(exc).__name__}: "
            f"{exc}). The payload is corrupt, or was pickled by an incompatible client. "
            "Fix: send it with statehost's client of the same version as the server.",
        ) from exc


def check_digest(section: Section, digest: str, where: str) -> None:
    """The function section must be the pickle the header's digest names."""
    actual = hashlib.sha256(section.payload).hexdigest()
    if actual != digest:
        raise ProtocolError(
            f"{where}: header digest {digest[:16]}... does not match the function "
            f"section's sha256 {actual[:16]}....")


def load_transform(section: Section, load_state: Callable[[StateRef], Any], where: str
                   ) -> Transform:
    """Unpickles a function section that must hold a statehost transform."""
    transform = unpickle(section, load_state, "function", where)
    if not isinstance(transform, StatefulMapping | StatefulFunction):
        raise ProtocolError(
            f"{where}: the function section holds {type(transform).__name__}, not a "
            "statehost transform. Fix: wrap it with client.pmap / client.vmap / client.jit.",
        )
    return transform


@dataclass
class CachedFunction:
    transform: Transform
    state_ids: frozenset[str]


class FunctionCache:
    """Least-recently-used map from key to :class:`CachedFunction`."""

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
