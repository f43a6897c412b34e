"""statehost.wire: the only code the client and the server share.

Frames (``_frame``), pickled sections and state references (``_pickle``),
typed messages (``_messages``; a loop's, ``_jobs``), versions (``_versions``) and the error kinds
(``_errors``). Pure Python + numpy + cloudpickle. Names load on first use (``statehost._lazy``).
"""

from statehost._lazy import lazy_exports as _lazy_exports

__all__ = [
    "CONTENT_TYPE",
    "ERROR_KINDS",
    "KEEP",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_DEPTH",
    "PROTOCOL",
    "CallReply",
    "CallRequest",
    "ControlRequest",
    "Encoded",
    "ErrorKind",
    "ErrorReply",
    "FetchReply",
    "FetchRequest",
    "Frame",
    "FreeRequest",
    "GetReply",
    "HandleRef",
    "GetRequest",
    "LoopRequest",
    "Message",
    "PullReply",
    "PullRequest",
    "PushReply",
    "PushRequest",
    "PutReply",
    "PutRequest",
    "RegisterReply",
    "RegisterRequest",
    "Section",
    "StateRecord",
    "StateRef",
    "StateValue",
    "decode",
    "decode_all",
    "encode",
    "fresh_buffer",
    "handle_name",
    "is_state_id",
    "local_versions",
    "outputs_signature",
    "pack",
    "state_ref",
    "unpack",
    "version_problems",
]

__getattr__, __dir__ = _lazy_exports(__name__, globals(), {
    **{name: "statehost.wire._frame" for name in (
        "CONTENT_TYPE", "Encoded", "Frame", "MAGIC", "MAX_HEADER_BYTES", "MAX_HEADER_DEPTH",
        "decode", "decode_all", "encode", "fresh_buffer")},
    **{name: "statehost.wire._messages" for name in (
        "CallReply", "CallRequest", "GetReply", "GetRequest", "Message", "PullReply",
        "PullRequest", "PushReply", "PushRequest", "PutReply", "PutRequest", "RegisterReply",
        "RegisterRequest", "is_state_id")},
    **{name: "statehost.wire._jobs" for name in ("KEEP", "LoopRequest")},
    **{name: "statehost.wire._errors" for name in (
        "ERROR_KINDS", "ErrorKind")},
    **{name: "statehost.wire._versions" for name in (
        "PROTOCOL", "local_versions", "version_problems")},
    **{name: "statehost.wire._pickle" for name in (
        "HandleRef", "Section", "StateRecord", "StateRef", "StateValue", "pack", "state_ref",
        "unpack")},
    **{name: "statehost.wire._stream" for name in (
        "ControlRequest", "ErrorReply", "FetchReply", "FetchRequest", "FreeRequest",
        "handle_name", "outputs_signature")},
})
