"""Persistence of named states: the SQLite index, state files, durability, flush, reload,
repair.

The database, durability and errors load at once (the ``statehost token`` commands need
them); the state files and the flushing service, which load JAX, on first use.
"""

from statehost._lazy import lazy_exports as _lazy_exports
from statehost.server.persistence.database import (
    SCOPES,
    DamagedDatabaseError,
    Database,
    FunctionRow,
    ObjectRow,
    StateRow,
    TokenRow,
    hash_token,
)
from statehost.server.persistence.durability import Durability
from statehost.server.persistence.errors import StorageError

__all__ = ["SCOPES", "DamagedDatabaseError", "DamagedStateError", "Database", "Durability",
           "FunctionRow", "ObjectRow", "Persistence", "StateRecord", "StateRow", "StorageError",
           "TokenRow", "flush", "flush_ids", "flusher", "hash_token", "state_file"]

__getattr__, __dir__ = _lazy_exports(__name__, globals(), {
    "DamagedStateError": "statehost.server.persistence.files",
    **{name: "statehost.server.persistence.flusher" for name in ("flush", "flush_ids",
                                                                 "flusher")},
    **{name: "statehost.server.persistence.service" for name in ("Persistence", "StateRecord",
                                                                 "state_file")},
})
