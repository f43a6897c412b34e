"""The client's exceptions: every failure a remote call can meet.

::

    StatehostError
    └── ClientError                     base of every client-side failure
        ├── TransportError              no answer: connection refused, timeout, broken socket
        ├── ClientClosedError           the client was used after close() (RuntimeError)
        ├── AuthError                   missing or rejected token (HTTP 401)
        ├── VersionMismatchError        client and server cannot exchange pickles
        ├── PayloadTooLargeError        a body over the server's max_body (HTTP 413)
        ├── ProtocolError               a malformed frame or request (HTTP 400/415)
        │   └── PayloadError            the server could not unpickle what was sent
        ├── StateNotFoundError          the server has no such state (HTTP 404)
        ├── NotFoundError               no such name, or not visible to this token (HTTP 404)
        ├── StateConflictError          an upload based on an outdated version (HTTP 409)
        ├── RemoteExecutionError        the user's function raised on the server (HTTP 422)
        └── ServerError                 the server failed (HTTP 5xx)
"""

from __future__ import annotations

from typing import Any

from statehost._errors import StatehostError

__all__ = [
    "AuthError",
    "ClientClosedError",
    "ClientError",
    "NotFoundError",
    "PayloadError",
    "PayloadTooLargeError",
    "ProtocolError",
    "RemoteExecutionError",
    "ServerError",
    "StateConflictError",
    "StateNotFoundError",
    "TransportError",
    "VersionMismatchError",
]


class ClientError(StatehostError):
    """Base of every error the client raises. ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, *, status: int | None = None, body: Any = None):
        super().__init__(message)
        self.status = status
        self.body = body if body is not None else {}


class TransportError(ClientError):
    """The server could not be reached, or did not answer in time."""


class ClientClosedError(ClientError, RuntimeError):
    """The client was used after ``close()``."""


class AuthError(ClientError):
    """The server wants a token, or rejected the one sent."""


class VersionMismatchError(ClientError):
    """Python, jax, cloudpickle or protocol versions differ between client and server."""


class PayloadTooLargeError(ClientError):
    """The request is larger than the server's ``max_body``."""


class ProtocolError(ClientError):
    """The server could not read the request (or the client could not read the answer)."""


class PayloadError(ProtocolError):
    """The server could not unpickle the callable or arguments.

    ``missing_module`` names the module the server lacked, when that was the cause.
    """

    @property
    def missing_module(self) -> str | None:
        return self.body.get("missing_module")


class StateNotFoundError(ClientError):
    """The server has no state with that id in this session (``missing`` lists them)."""

    @property
    def missing(self) -> list[str]:
        return list(self.body.get("missing", []))


class NotFoundError(ClientError):
    """No object, function or namespace of that name is visible to this token."""


class StateConflictError(ClientError):
    """The server refused a lost update: a state changed there since this client synced.

    ``conflicts`` lists ``{"id", "name", "server_version", "base_version", "writer"}``.
    Nothing was committed. ``client.pull`` re-bases; ``retries=N`` does it for you.
    """

    @property
    def conflicts(self) -> list[dict[str, Any]]:
        return list(self.body.get("conflicts", []))


class RemoteExecutionError(ClientError):
    """The function raised on the server; every state kept its previous value.

    ``exception_type`` is the remote exception's class name and
    ``remote_traceback`` the traceback text, starting at the user's own code.
    """

    @property
    def exception_type(self) -> str:
        return str(self.body.get("exception_type", ""))

    @property
    def remote_traceback(self) -> str:
        return str(self.body.get("traceback", ""))


class ServerError(ClientError):
    """The server failed (5xx); the message carries its traceback."""


BY_TYPE: dict[str, type[ClientError]] = {
    "AuthError": AuthError,
    "VersionMismatchError": VersionMismatchError,
    "PayloadTooLargeError": PayloadTooLargeError,
    "ProtocolError": ProtocolError,
    "PayloadError": PayloadError,
    "StateNotFoundError": StateNotFoundError,
    "StateConflictError": StateConflictError,
    "NotFound": NotFoundError,
    "RemoteExecutionError": RemoteExecutionError,
    "ServerError": ServerError,
}
