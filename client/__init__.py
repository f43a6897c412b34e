"""statehost.client: run statehost transforms on a remote ``statehost serve``.

Imports httpx, cloudpickle and the core; never the server.
"""

from statehost.client._client import Client, connect
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
from statehost.client._ledger import SyncLedger
from statehost.client._remote import RemoteDevice, RemoteMapping
from statehost.client._transport import FrameTransport

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
    "RemoteMapping",
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
