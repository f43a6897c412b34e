"""Persistence of named states: the SQLite index, state files, durability, flush, reload,
repair."""

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
from statehost.server.persistence.files import DamagedStateError
from statehost.server.persistence.flusher import flush, flush_ids, flusher
from statehost.server.persistence.service import Persistence, StateRecord, state_file

__all__ = ["SCOPES", "DamagedDatabaseError", "DamagedStateError", "Database", "Durability",
           "FunctionRow", "ObjectRow", "Persistence", "StateRecord", "StateRow", "StorageError",
           "TokenRow", "flush", "flush_ids", "flusher", "hash_token", "state_file"]
