"""statehost.client: run statehost transforms on a remote ``statehost serve``.

Imports httpx, cloudpickle and the core; never the server.
"""

from statehost.client._client import Client, connect
from statehost.client._errors import (
    AuthError,
    ClientClosedError,
    ClientError,
    NotFoundError,
    PayloadError,
    PayloadTooLargeError,
    ProtocolError,
    RemoteExecutionError,
    ServerError,
    StateConflictError,
    StateNotFoundError,
    TransportError,
    VersionMismatchError,
)
from statehost.client._remote import RemoteDevice, RemoteMapping

__all__ = [
    "AuthError",
    "Client",
    "ClientClosedError",
    "ClientError",
    "NotFoundError",
    "PayloadError",
    "PayloadTooLargeError",
    "ProtocolError",
    "RemoteDevice",
    "RemoteExecutionError",
    "RemoteMapping",
    "ServerError",
    "StateConflictError",
    "StateNotFoundError",
    "TransportError",
    "VersionMismatchError",
    "connect",
]
