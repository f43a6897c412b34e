"""statehost.client: run statehost transforms on a remote ``statehost serve``.

Imports httpx, cloudpickle and the core; never the server.
"""

from statehost.client._client import Client, connect
from statehost.client._errors import (
    AuthError,
    ClientClosedError,
    ClientError,
    PayloadError,
    PayloadTooLargeError,
    ProtocolError,
    RemoteExecutionError,
    ServerError,
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
    "PayloadError",
    "PayloadTooLargeError",
    "ProtocolError",
    "RemoteDevice",
    "RemoteExecutionError",
    "RemoteMapping",
    "ServerError",
    "StateNotFoundError",
    "TransportError",
    "VersionMismatchError",
    "connect",
]
