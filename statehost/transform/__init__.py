"""State-aware transforms: ``StatefulMapping``, ``pmap``, ``vmap``, ``jit``."""

from statehost.transform._cache import CacheInfo
from statehost.transform._jit import StatefulFunction, jit
from statehost.transform._mapping import StatefulMapping
from statehost.transform._transforms import pmap, vmap

__all__ = ["CacheInfo", "StatefulFunction", "StatefulMapping", "jit", "pmap", "vmap"]
