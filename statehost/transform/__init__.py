"""State-aware transforms: ``StatefulMapping``, ``pmap``, ``vmap``, ``jit``."""

from statehost.transform._cache import CacheInfo
from statehost.transform._commit import PendingWrites, defer_writes
from statehost.transform._jit import StatefulFunction, jit
from statehost.transform._mapping import StatefulMapping
from statehost.transform._placement import Placement
from statehost.transform._programs import ProgramCache
from statehost.transform._transforms import pmap, vmap

__all__ = [
    "CacheInfo",
    "PendingWrites",
    "Placement",
    "ProgramCache",
    "StatefulFunction",
    "StatefulMapping",
    "defer_writes",
    "jit",
    "pmap",
    "vmap",
]
