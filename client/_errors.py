"""The client's exceptions: every failure a remote call can meet.

::

    StatehostError
    └── ClientError                     base of every client-side failure
        ├── TransportError              no answer: connection refused, timeout, broken socket
        ├── ClientClosedError           the client was used after close() (RuntimeError)
        ├── AuthError                   missing or rejected token (HTTP 401)
        │   └── ForbiddenError          the token's scope does not allow this (HTTP 403)
        ├── VersionMismatchError        client and server cannot exchange pickles
        ├── PayloadTooLargeError        a body over the server's max_body (HTTP 413)
        ├── ProtocolError               a malformed frame or request (HTTP 400)
        │   ├── PayloadError            the server could not unpickle what was sent
        │   ├── MethodNotAllowedError   the route does not take this method (HTTP 405)
        │   ├── UnsupportedMediaTypeError  a body of the wrong content type (HTTP 415)
        │   ├── ValidationError         well-formed, but invalid values (HTTP 422)
        │   └── FunctionNotCachedError  the server dropped a callable (HTTP 409; resent)
        ├── NotFoundError               no such name, or not visible to this token (HTTP 404)
        │   ├── SessionNotFoundError    the session is closed (HTTP 404; reopened for you)
        │   ├── StateNotFoundError      the server has no such state (HTTP 404)
        │   ├── ArrayNotFoundError      a RemoteArray the server no longer keeps (HTTP 404)
        │   ├── CallNotFoundError       no such queued or running call of yours (HTTP 404)
        │   └── JobNotFoundError        no such job visible to this token (HTTP 404)
        ├── CallTimeoutError            a call dropped at its deadline, never started (408)
        ├── StateConflictError          an upload based on an outdated version (HTTP 409)
        ├── StateDamagedError           a named state the server could not load (HTTP 409)
        ├── NameConflictError           a state that already belongs to another name (409)
        ├── PreconditionFailedError     If-Match named another version (HTTP 412)
        ├── CallCancelledError          cancelled before it started; nothing applied (409)
        ├── CallNotRunError             an earlier call failed, so this one did not run (424)
        ├── JobNotDoneError             the job's result is not there yet (409; a TimeoutError)
        ├── JobCancelledError           the job was cancelled or timed out (HTTP 409)
        ├── QuotaExceededError          a namespace quota would be exceeded (HTTP 429)
        ├── RemoteExecutionError        the user's function raised on the server (HTTP 422)
        │   └── RemoteExecutionError(cls)  also a ``cls``, the remote exception's class, when
        │                               the client can import it (``except TypeError`` works)
        └── ServerError                 the server failed (HTTP 5xx)
            ├── StorageError            the server's disk failed; nothing was applied (503)
            ├── DeviceMemoryError       the call does not fit in device memory; not run (507)
            ├── ClusterUnavailableError a process of the server's group is lost (503)
            └── GroupUnsupportedError   not run on a server of several processes (501)

Which class answers which error kind of the wire (``statehost.wire.ERROR_KINDS``) is
:data:`BY_TYPE`, checked against that table by the tests; a ``RemoteExecutionError`` is
made by :func:`remote_execution_error`.
"""

from __future__ import annotations

import builtins
import importlib
import sys
from typing import Any

from statehost._errors import StatehostError

__all__ = [
    "BY_TYPE",
    "ArrayNotFoundError",
    "AuthError",
    "CallCancelledError",
    "CallNotFoundError",
    "CallNotRunError",
    "CallTimeoutError",
    "ClientClosedError",
    "ClientError",
    "ClusterUnavailableError",
    "DeviceMemoryError",
    "ForbiddenError",
    "FunctionNotCachedError",
    "GroupUnsupportedError",
    "JobCancelledError",
    "JobNotDoneError",
    "JobNotFoundError",
    "MethodNotAllowedError",
    "NameConflictError",
    "NotFoundError",
    "PayloadError",
    "PayloadTooLargeError",
    "PreconditionFailedError",
    "ProtocolError",
    "QuotaExceededError",
    "RemoteExecutionError",
    "ServerError",
    "SessionNotFoundError",
    "StateConflictError",
    "StateDamagedError",
    "StateNotFoundError",
    "StorageError",
    "TransportError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "VersionMismatchError",
    "remote_execution_error",
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


class ForbiddenError(AuthError):
    """The token's scope does not allow this."""


class VersionMismatchError(ClientError):
    """Python, jax, cloudpickle or protocol versions differ between client and server."""


class PayloadTooLargeError(ClientError):
    """The request is larger than the server's ``max_body``."""


class ProtocolError(ClientError):
    """The server could not read the request (or the client could not read the answer)."""


class MethodNotAllowedError(ProtocolError):
    """The route does not take this HTTP method."""


class UnsupportedMediaTypeError(ProtocolError):
    """The body was sent with the wrong content type."""


class ValidationError(ProtocolError):
    """The request was well formed but a value in it is invalid."""


class FunctionNotCachedError(ProtocolError):
    """The server no longer has the callable; the client sends it again by itself."""


class PayloadError(ProtocolError):
    """The server could not unpickle the callable or arguments.

    ``missing_module`` names the module the server lacked, when that was the cause.
    """

    @property
    def missing_module(self) -> str | None:
        return self.body.get("missing_module")


class NotFoundError(ClientError):
    """No object, function or namespace of that name is visible to this token."""


class SessionNotFoundError(NotFoundError):
    """The session is closed (idle past its TTL, or the server restarted)."""


class StateNotFoundError(NotFoundError):
    """The server has no state with that id in this session (``missing`` lists them)."""

    @property
    def missing(self) -> list[str]:
        return list(self.body.get("missing", []))


class CallNotFoundError(NotFoundError):
    """No queued or running call with that id belongs to this token (it finished, or it
    was never this token's)."""


class CallTimeoutError(ClientError):
    """The call waited on the server past its deadline and was dropped before it started:
    nothing was applied, and sending it again is safe."""


class ArrayNotFoundError(NotFoundError):
    """A ``RemoteArray`` passed to a call is no longer kept on the server."""


class CallCancelledError(ClientError):
    """The call was cancelled (Ctrl-C, ``cancel()``) before it started: nothing applied."""


class CallNotRunError(ClientError):
    """The call was not run: an earlier asynchronous call of this client failed first.

    Calls queued behind a failure do not run, so no state moves past the failed
    call. The failure itself is raised once, at the next point that synchronises.
    """


class StateConflictError(ClientError):
    """The server refused a lost update: a state changed there since this client synced.

    ``conflicts`` lists ``{"id", "name", "server_version", "base_version", "writer"}``.
    Nothing was committed. ``client.pull`` re-bases; ``retries=N`` does it for you.
    """

    @property
    def conflicts(self) -> list[dict[str, Any]]:
        return list(self.body.get("conflicts", []))


class StateDamagedError(ClientError):
    """A named state the server could not load from its disk."""


class NameConflictError(ClientError):
    """A state that already belongs to another named object."""


class PreconditionFailedError(ClientError):
    """``If-Match`` named another version than the state's current one."""


class RemoteExecutionError(ClientError):
    """The function raised on the server; every state kept its previous value.

    ``exception_type`` is the remote exception's class name, ``exception_message`` its
    text and ``remote_traceback`` the traceback text, starting at the user's own code.
    When the client can import that class, the error raised is also an instance of it
    (its type is ``RemoteExecutionError(TypeError)``, say), so ``except TypeError`` catches
    it; see :func:`remote_execution_error`.
    """

    @property
    def exception_type(self) -> str:
        return str(self.body.get("exception_type", ""))

    @property
    def exception_module(self) -> str:
        return str(self.body.get("exception_module", ""))

    @property
    def exception_message(self) -> str:
        return str(self.body.get("exception_message", ""))

    @property
    def remote_traceback(self) -> str:
        return str(self.body.get("traceback", ""))


class ServerError(ClientError):
    """The server failed (5xx); the message carries its traceback."""


class StorageError(ServerError):
    """The server could not write to its disk; the request was not applied."""


class DeviceMemoryError(ServerError):
    """The call does not fit in the free memory of the server's devices, or XLA ran out of
    device memory while it ran; nothing was applied. ``estimate_bytes`` and ``free_bytes``
    are the server's figures (``None`` when XLA itself ran out)."""

    @property
    def estimate_bytes(self) -> int | None:
        value = self.body.get("estimate_bytes")
        return value if isinstance(value, int) else None

    @property
    def free_bytes(self) -> int | None:
        value = self.body.get("free_bytes")
        return value if isinstance(value, int) else None


class JobNotFoundError(NotFoundError):
    """No job with that id is visible to this token."""


class JobNotDoneError(ClientError, TimeoutError):
    """The job is still queued or running; ``Job.result(timeout=...)`` waits for it."""


class JobCancelledError(ClientError):
    """The job was cancelled (or timed out) between steps.

    Its states are those of its last completed step: ``completed`` says how many steps
    committed, ``reason`` is ``"cancelled"`` or ``"timeout"``.
    """

    @property
    def completed(self) -> int:
        return int(self.body.get("completed", 0))

    @property
    def reason(self) -> str:
        return str(self.body.get("reason", "cancelled"))


class QuotaExceededError(ClientError):
    """The request would take a namespace past a quota (HTTP 429); nothing was applied.

    ``namespace``, ``quota`` (``max_bytes``, ``max_bytes_per_device``, ``max_sessions`` or
    ``max_queued``), ``limit``, ``used`` and ``requested`` say which and by how much;
    ``largest`` lists the namespace's largest states (``name``, ``id``, ``bytes``).
    """

    @property
    def namespace(self) -> str:
        return str(self.body.get("namespace", ""))

    @property
    def quota(self) -> str:
        return str(self.body.get("quota", ""))


class ClusterUnavailableError(ServerError):
    """A process of the server's group of processes is lost (HTTP 503): the call was not
    run, or (running when the process was lost) did not finish; the operator restarts the
    whole group. ``processes`` lists the lost processes' indices."""

    @property
    def processes(self) -> list[int]:
        value = self.body.get("processes", [])
        return [int(i) for i in value] if isinstance(value, list) else []


class GroupUnsupportedError(ServerError):
    """The server spans several processes and does not run this request there (HTTP 501):
    jobs, loops, invokes and the JSON value API need a single-process server for now."""


#: error kind name (``statehost.wire.ERROR_KINDS``) -> the class raised for it.
BY_TYPE: dict[str, type[ClientError]] = {
    cls.__name__: cls for cls in (
        ProtocolError, PayloadError, VersionMismatchError, AuthError, ForbiddenError,
        NotFoundError, SessionNotFoundError, StateNotFoundError, MethodNotAllowedError,
        FunctionNotCachedError, StateConflictError, StateDamagedError, NameConflictError,
        PreconditionFailedError, PayloadTooLargeError, UnsupportedMediaTypeError,
        ValidationError, RemoteExecutionError, ServerError, StorageError, ArrayNotFoundError,
        CallCancelledError, CallNotRunError, CallNotFoundError, CallTimeoutError,
        JobNotFoundError, JobNotDoneError, JobCancelledError, DeviceMemoryError,
        QuotaExceededError, ClusterUnavailableError, GroupUnsupportedError,
    )
}


# -- RemoteExecutionError(cls) -----------------------------------------------------------
def _remote_class(module: object, qualname: object) -> type[Exception] | None:
    """The remote exception's class, if it is a builtin or importable here, else ``None``.

    Importing is safe to try: the client already trusts this server with its pickles (it
    loads the results), and a module that fails to import only means no class.
    """
    if not isinstance(module, str) or not isinstance(qualname, str) or not qualname:
        return None
    if "<locals>" in qualname.split("."):
        return None  # defined inside a function: there is no name to find it by
    try:
        found: Any = builtins if module == "builtins" else (
            sys.modules.get(module) or importlib.import_module(module))
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception:
        return None
    if not (isinstance(found, type) and issubclass(found, Exception)):
        return None
    if issubclass(found, ClientError):
        return None  # the client's own errors are never doubled
    return found


def _with_cause(cause: type[Exception]) -> type[RemoteExecutionError]:
    """``RemoteExecutionError(cause)``: both classes, as Ray's ``RayTaskError(cls)`` is.

    The remote class's ``__init__`` is never called: its signature is the remote code's
    business, and the error only carries statehost's message. Its ``__str__`` is not used
    either (``KeyError`` would print the message quoted).
    """

    def __init__(self: RemoteExecutionError, message: str, *, status: int | None = None,
                 body: Any = None) -> None:
        BaseException.__init__(self, message)
        self.status = status
        self.body = body if body is not None else {}

    def __str__(self: RemoteExecutionError) -> str:
        return BaseException.__str__(self)

    def __reduce__(self: RemoteExecutionError) -> tuple[Any, ...]:
        return (_rebuild, (str(self), self.status, self.body))

    name = f"RemoteExecutionError({cause.__qualname__})"
    return type(name, (RemoteExecutionError, cause), {
        "__init__": __init__, "__str__": __str__, "__reduce__": __reduce__,
        "__module__": RemoteExecutionError.__module__, "__qualname__": name,
        "__doc__": f"A remote {cause.__qualname__}: also a RemoteExecutionError.",
    })


def remote_execution_error(message: str, *, status: int | None, body: Any
                           ) -> RemoteExecutionError:
    """The error for a remote exception: ``RemoteExecutionError(cls)`` when the body's
    ``exception_module`` / ``exception_type`` name a class the client can import (a
    builtin, a library's, one of the user's modules), else a plain ``RemoteExecutionError``.

    Arguments:
        message: the error's text (with the remote traceback).
        status: the HTTP status (422).
        body: the error body: ``exception_type``, ``exception_module``, ``traceback``...

    Returns:
        The exception to raise.

    Example:
        >>> error = remote_execution_error("boom", status=422, body={
        ...     "exception_type": "TypeError", "exception_module": "builtins"})
        >>> isinstance(error, TypeError), isinstance(error, RemoteExecutionError)
        (True, True)
    """
    body = body if body is not None else {}
    cause = _remote_class(body.get("exception_module"), body.get("exception_type"))
    if cause is not None:
        try:
            return _with_cause(cause)(message, status=status, body=body)
        except Exception:  # a metaclass or __new__ that will not mix: the plain error
            pass
    return RemoteExecutionError(message, status=status, body=body)


def _rebuild(message: str, status: int | None, body: Any) -> RemoteExecutionError:
    return remote_execution_error(message, status=status, body=body)
