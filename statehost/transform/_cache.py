"""Compile caches of the stateful transforms, and ``statehost.clear_caches()``.

Each transform object owns its cache; a weak registry lets
``statehost.clear_caches()`` empty all of them without keeping any alive.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple, Protocol

__all__ = ["CacheInfo", "clear_caches", "register"]


class CacheInfo(NamedTuple):
    """Counters of one transform's cache.

    Attributes:
        hits: calls served by an existing compiled function.
        misses: calls that had to probe the function and compile it.
        traces: how many times the user's Python function body ran.
        entries: compiled functions currently cached.
        shared: calls served by a plan and compiled function that another transform
            of the same code made (see ``share_programs``): no trace, no compile.
    """

    hits: int
    misses: int
    traces: int
    entries: int
    shared: int = 0


class _Clearable(Protocol):
    def clear_cache(self) -> None: ...


_REGISTRY: weakref.WeakSet[_Clearable] = weakref.WeakSet()


def register(obj: _Clearable) -> None:
    """Lets :func:`clear_caches` reach ``obj`` while it is alive."""
    _REGISTRY.add(obj)


def clear_caches() -> None:
    """Drops every compiled function and probe result held by statehost transforms.

    Example:
        >>> import statehost
        >>> statehost.clear_caches()
    """
    for obj in list(_REGISTRY):
        obj.clear_cache()
