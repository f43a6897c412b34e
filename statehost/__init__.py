"""statehost: resident JAX state and state-aware pmap / vmap / jit.

The core library: ``State`` and its kinds, ``nn.Module``, ``random``,
``util.filter`` and ``transform``. It works with no server at all; the client
(``statehost.client``) and the server (``statehost.server``) build on it.
"""

from statehost import nn, random, transform, util
from statehost._connect import connect
from statehost._errors import BatchAxisError, StatehostError, StateTraceError, WireError
from statehost._state import HiddenState, LongTermState, ParamState, ShortTermState, State
from statehost.transform._cache import clear_caches

__version__ = "0.1.0"

__all__ = [
    "BatchAxisError",
    "HiddenState",
    "LongTermState",
    "ParamState",
    "ShortTermState",
    "State",
    "StateTraceError",
    "StatehostError",
    "WireError",
    "clear_caches",
    "connect",
    "nn",
    "random",
    "transform",
    "util",
]
