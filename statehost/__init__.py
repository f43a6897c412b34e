"""statehost: resident JAX state and state-aware pmap / vmap / jit.

The core library: ``State`` and its kinds, ``nn.Module``, ``random``,
``util.filter`` and ``transform``. It works with no server at all; the client
(``statehost.client``) and the server (``statehost.server``) build on it.
Names load on first use (``statehost._lazy``), so importing statehost starts no JAX.
"""

from statehost._connect import connect
from statehost._errors import BatchAxisError, StatehostError, StateTraceError, WireError
from statehost._lazy import lazy_exports as _lazy_exports

__version__ = "0.1.0"

__all__ = [
    "BatchAxisError",
    "DeferredValue",
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

__getattr__, __dir__ = _lazy_exports(__name__, globals(), {
    **{name: "statehost._state" for name in (
        "DeferredValue", "HiddenState", "LongTermState", "ParamState", "ShortTermState",
        "State")},
    "clear_caches": "statehost.transform._cache",
}, modules=("nn", "random", "transform", "util"))
