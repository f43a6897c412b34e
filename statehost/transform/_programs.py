"""Programs shared between transforms of the same code: :class:`ProgramCache`.

A server unpickles one transform per session (it closes over that session's
states), so two clients running the same function hold two transforms. What
they can share is what the code and the abstract signature decide: the plan
(which states go in and out, on which axes) and the traced, transformed and
compiled program. The program takes every state value as an argument (the
pure function reads states only through its arguments), so it holds no state
value of the transform that built it, and no ``State`` object either: a
:class:`SharedPlan` names states by their position in the transform's
``states`` (the order in which its pickle met them).

A transform shares only when told to (:meth:`StatefulCall.share_programs`):
the caller vouches that equal ``code`` keys mean equal code, and that states
at equal positions play equal roles. The lookup key adds what the call
decides: the arguments' tree structure, shapes, dtypes, static arguments (with
their types), and the shapes of the states the plan uses.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from statehost.transform._cache import register

__all__ = ["ProgramCache", "ProgramObserver", "SharedPlan"]

# Plans kept per key: they differ only by the shapes of their states.
_PLANS_PER_KEY = 8


class ProgramObserver(Protocol):
    """Told where each program a sharing transform runs came from (the server's metrics).

    ``built()`` wraps the first run of a program the transform has just traced: that
    is where JAX compiles it, or loads it from its persistent compilation cache.
    ``adopted()`` says a transform took a program another transform built.
    """

    def built(self) -> AbstractContextManager[None]: ...

    def adopted(self) -> None: ...


@dataclass(frozen=True, eq=False)
class SharedPlan:
    """A ``Plan`` with its states named by position (see the module docstring).

    Attributes:
        inputs, in_axes, rngs, outputs, out_axes, lanes, dummy_lanes, compiled: as in
            ``Plan``, with positions in place of states.
        signature: ``(position, shape signature)`` of every state the plan uses.
        per_lane: positions of the states an ``'auto'`` mapping had found to be
            per-lane buffers once the plan was made.
    """

    inputs: tuple[int, ...]
    in_axes: tuple[int | None, ...]
    rngs: tuple[int, ...]
    outputs: tuple[int, ...]
    out_axes: tuple[int | None, ...]
    signature: tuple[tuple[int, Any], ...]
    lanes: int | None
    dummy_lanes: bool
    compiled: Callable[..., Any]
    per_lane: frozenset[int]


class ProgramCache:
    """Least-recently-used map from (code, call signature) to shared plans.

    Thread-safe; ``statehost.clear_caches()`` empties it.

    Arguments:
        max_entries: keys kept (each holds up to 8 plans, one per state shapes).
        observer: told where each program came from; ``None``: nobody is told.

    Example:
        >>> import jax.numpy as jnp, statehost
        >>> from statehost.transform import ProgramCache, jit
        >>> cache = ProgramCache()
        >>> def inc(x):
        ...     return x + 1
        >>> first, second = jit(inc), jit(inc)
        >>> first.share_programs(cache, "inc", [])
        >>> second.share_programs(cache, "inc", [])
        >>> _ = first(jnp.ones(2)); _ = second(jnp.ones(2))
        >>> second.cache_info().shared, second.cache_info().traces
        (1, 0)
    """

    def __init__(self, max_entries: int = 256, *, observer: ProgramObserver | None = None):
        if max_entries < 1:
            raise ValueError(f"ProgramCache(max_entries={max_entries!r}): must be >= 1.")
        self.max_entries = max_entries
        self.observer = observer
        self._entries: OrderedDict[Hashable, list[SharedPlan]] = OrderedDict()
        self._lock = threading.Lock()
        register(self)

    def candidates(self, key: Hashable) -> list[SharedPlan]:
        """The plans kept under ``key``, most recent first."""
        with self._lock:
            plans = self._entries.get(key)
            if plans is None:
                return []
            self._entries.move_to_end(key)
            return plans[::-1]

    def add(self, key: Hashable, plan: SharedPlan) -> None:
        with self._lock:
            plans = self._entries.setdefault(key, [])
            plans.append(plan)
            del plans[:-_PLANS_PER_KEY]
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear_cache(self) -> None:
        """Forgets every shared program."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return sum(len(plans) for plans in self._entries.values())

    # -- the observer's two moments ---------------------------------------------
    def built(self) -> AbstractContextManager[None]:
        return self.observer.built() if self.observer is not None else _nothing()

    def adopted(self) -> None:
        if self.observer is not None:
            self.observer.adopted()

    def __repr__(self) -> str:
        return f"ProgramCache(max_entries={self.max_entries}, plans={len(self)})"


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


@dataclass(frozen=True, eq=False)
class Sharing:
    """What :meth:`StatefulCall.share_programs` was told: the cache, the code's key, and
    the transform's states in the order that key numbers them."""

    cache: ProgramCache
    code: Hashable | None
    states: tuple[Any, ...]
    positions: dict[Any, int]
