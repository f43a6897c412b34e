"""statehost.client: run statehost transforms on a remote ``statehost serve``.

Imports httpx, cloudpickle and the core; never the server. The exceptions load at
once; the client itself (and with it JAX) on first use.
"""

from statehost._lazy import lazy_exports as _lazy_exports
from statehost.client._errors import (
    AuthError,
    ClientClosedError,
    ClientError,
    ForbiddenError,
    FunctionNotCachedError,
    MethodNotAllowedError,
    NameConflictError,
    NotFoundError,
    PayloadError,
    PayloadTooLargeError,
    PreconditionFailedError,
    ProtocolError,
    RemoteExecutionError,
    ServerError,
    SessionNotFoundError,
    StateConflictError,
    StateDamagedError,
    StateNotFoundError,
    StorageError,
    TransportError,
    UnsupportedMediaTypeError,
    ValidationError,
    VersionMismatchError,
)

__all__ = [
    "AuthError",
    "Client",
    "ClientClosedError",
    "ClientError",
    "ForbiddenError",
    "FrameTransport",
    "FunctionNotCachedError",
    "MethodNotAllowedError",
    "NameConflictError",
    "NotFoundError",
    "PayloadError",
    "PayloadTooLargeError",
    "PreconditionFailedError",
    "ProtocolError",
    "RemoteDevice",
    "RemoteExecutionError",
    "RemotePlacement",
    "ServerError",
    "SessionNotFoundError",
    "StateConflictError",
    "StateDamagedError",
    "StateNotFoundError",
    "StorageError",
    "SyncLedger",
    "TransportError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "VersionMismatchError",
    "connect",
]

__getattr__, __dir__ = _lazy_exports(__name__, globals(), {
    "Client": "statehost.client._client",
    "connect": "statehost.client._client",
    "SyncLedger": "statehost.client._ledger",
    "RemoteDevice": "statehost.client._remote",
    "RemotePlacement": "statehost.client._remote",
    "FrameTransport": "statehost.client._transport",
})
