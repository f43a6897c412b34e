"""The error kinds both sides know: each name's HTTP status and meaning, in one table.

An error answer's body is ``{"error": {"type": NAME, "message": ..., "traceback"?: ...}}``.
The server raises one exception class per kind (``statehost.server.errors``); the
client raises one exception class per kind (``statehost.client``). Both derive
their tables from :data:`ERROR_KINDS`, and a test checks that they cover it.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["ERROR_KINDS", "ErrorKind"]


class ErrorKind(NamedTuple):
    name: str
    status: int
    meaning: str


ERROR_KINDS: dict[str, ErrorKind] = {kind.name: kind for kind in (
    ErrorKind("ProtocolError", 400, "a malformed frame, header or request"),
    ErrorKind("PayloadError", 400, "a pickle the server could not load"),
    ErrorKind("VersionMismatchError", 400, "client and server cannot exchange pickles"),
    ErrorKind("AuthError", 401, "no token, or a token the server does not accept"),
    ErrorKind("ForbiddenError", 403, "the token's scope does not allow this"),
    ErrorKind("NotFoundError", 404, "no such name, route or object visible to this token"),
    ErrorKind("SessionNotFoundError", 404, "no such open session for this token"),
    ErrorKind("StateNotFoundError", 404, "no such state visible to this session"),
    ErrorKind("CallNotFoundError", 404, "no such queued or running call visible to this token"),
    ErrorKind("ArrayNotFoundError", 404, "no such array kept on the server for this session"),
    ErrorKind("MethodNotAllowedError", 405, "the route does not take this method"),
    ErrorKind("CallTimeoutError", 408, "a call that waited past its deadline and was never "
              "started; nothing applied"),
    ErrorKind("FunctionNotCachedError", 409, "the server no longer has that callable"),
    ErrorKind("StateConflictError", 409, "an upload based on an outdated version"),
    ErrorKind("StateDamagedError", 409, "a named state that could not be loaded"),
    ErrorKind("NameConflictError", 409, "a state that already belongs to another name"),
    ErrorKind("CallCancelledError", 409, "the call was cancelled before it started"),
    ErrorKind("PreconditionFailedError", 412, "If-Match names another version"),
    ErrorKind("PayloadTooLargeError", 413, "a body over the server's limit"),
    ErrorKind("UnsupportedMediaTypeError", 415, "a body of the wrong content type"),
    ErrorKind("ValidationError", 422, "a well-formed request with invalid values"),
    ErrorKind("RemoteExecutionError", 422, "the user's function raised"),
    ErrorKind("CallNotRunError", 424, "an earlier call of this client failed: not run"),
    ErrorKind("ServerError", 500, "a fault of the server itself"),
    ErrorKind("StorageError", 503, "the server could not write to its disk; nothing applied"),
    ErrorKind("JobNotFoundError", 404, "no such job visible to this token"),
    ErrorKind("JobNotDoneError", 409, "the job has not finished: its result is not there yet"),
    ErrorKind("JobCancelledError", 409,
              "the job was cancelled or timed out; its states are at its last completed step"),
    ErrorKind("DeviceMemoryError", 507,
              "the call does not fit in the devices' free memory; it was not run"),
    ErrorKind("QuotaExceededError", 429, "a namespace quota would be exceeded; nothing applied"),
    ErrorKind("ClusterUnavailableError", 503,
              "a process of the server's group is lost; the group must be restarted"),
    ErrorKind("GroupUnsupportedError", 501,
              "not supported on a server spanning several processes (yet)"),
)}
