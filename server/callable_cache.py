"""Shipped callables: unpickling them safely, and the cache of unpickled transforms.

A repeat call with the same pickled callable (same code, same states) reuses
the unpickled ``StatefulMapping`` and with it the core's plan and compile
cache, so it neither unpickles, nor traces, nor compiles again. Entries are
keyed by the owner (a session, or a registered function's name) and the sha256
digest of the pickle, and are evicted when a state they refer to is freed.

Across sessions, transforms of the same code share their plans and compiled
programs (``FunctionCache.programs``, see :func:`share_programs`): the code's key
is the pickle with its states numbered in the order it met them, so a second
client running the same function on its own states neither traces nor compiles.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from statehost._errors import WireError
from statehost._state import State
from statehost.server.errors import ApiError, PayloadError, ProtocolError
from statehost.transform import ProgramCache, StatefulFunction, StatefulMapping
from statehost.wire import HandleRef, Section, StateRef

__all__ = ["CachedFunction", "FunctionCache", "RecordingLoader", "check_digest", "code_key",
           "load_transform", "share_programs", "unpickle"]

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
    """Least-recently-used map from key to :class:`CachedFunction`; ``programs`` holds the
    plans and compiled programs its transforms share across sessions (as many entries)."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, CachedFunction] = OrderedDict()
        self._lock = threading.Lock()
        self.programs = ProgramCache(max_entries)

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

    def items(self) -> list[tuple[str, CachedFunction]]:
        """A snapshot of the entries, least recently used first."""
        with self._lock:
            return list(self._entries.items())

    def __len__(self) -> int:
        return len(self._entries)


# -- programs shared across sessions -----------------------------------------------
# A state id as the client makes it (uuid4 hex), and the mark that replaces it in a key:
# "@" is no hex digit, so a key's marks come from replaced ids only (checked below).
_STATE_ID = re.compile(r"[0-9a-f]{32}")
_MARK = re.compile(rb"@[0-9]{31}")


class RecordingLoader:
    """A ``persistent_load`` that writes down what the pickle refers to, in order
    (``met``): the ``State`` each reference loaded, and each ``HandleRef`` itself."""

    def __init__(self, load_ref: Callable[[StateRef | HandleRef], Any]):
        self._load_ref = load_ref
        self.met: list[Any] = []

    def __call__(self, ref: StateRef | HandleRef) -> Any:
        loaded = self._load_ref(ref)
        self.met.append(ref if isinstance(ref, HandleRef) else loaded)
        return loaded


def code_key(section: Section, states: list[State], stream_at: int | None) -> str | None:
    """What decides a shipped function's programs, whoever's states it refers to.

    The sha256 of the pickle with each state's id replaced by its position in
    ``states`` (the order the pickle met them), of its out-of-band buffers (array
    constants in closures), and of where the default stream is (``stream_at``).
    Two pickles have the same key exactly when they are the same code on states in
    the same roles. ``None`` (do not share) when a state id is not a uuid4 hex or the
    pickle already holds a mark, so the replacement could not be undone.
    """
    payload = bytes(section.payload)
    if _MARK.search(payload) or not all(_STATE_ID.fullmatch(st.id) for st in states):
        return None
    for position, st in enumerate(states):
        payload = payload.replace(st.id.encode(), b"@%031d" % position)
    digest = hashlib.sha256(payload)
    digest.update(f"|stream:{stream_at}|buffers:{len(section.buffers)}|".encode())
    for buffer in section.buffers:
        digest.update(f"{buffer.nbytes}:".encode())
        digest.update(buffer)
    return digest.hexdigest()


def share_programs(cache: ProgramCache, transform: Transform, section: Section,
                   met: list[Any], stream: State | None) -> bool:
    """Lets ``transform`` share programs with other sessions' transforms of the same code.

    ``met`` lists what unpickling the function section loaded, in order: ``State``
    objects, and a ``HandleRef`` for each array this session keeps. A function that captures a kept
    array is not shared: the array would be a constant of its traced program. The
    default ``stream`` (a state the pickle does not name) is numbered after the
    pickle's states. Returns whether the programs are shared; either way the cache's
    observer hears of every program the transform builds.
    """
    named = list(dict.fromkeys(m for m in met if isinstance(m, State)))
    states, stream_at = list(named), None
    if stream is not None:
        if stream not in states:
            states.append(stream)
        stream_at = states.index(stream)
    kept_arrays = any(isinstance(m, HandleRef) for m in met)
    code = None if kept_arrays else code_key(section, named, stream_at)
    transform.share_programs(cache, code, states)
    return code is not None
