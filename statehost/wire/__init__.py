"""statehost.wire: the only code the client and the server share.

Frames (``_frame``), pickled sections and state references (``_pickle``),
typed messages (``_messages``), versions (``_versions``) and the error kinds
(``_errors``). Pure Python + numpy + cloudpickle.
"""

from statehost.wire._errors import ERROR_KINDS, ErrorKind
from statehost.wire._frame import (
    CONTENT_TYPE,
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_HEADER_DEPTH,
    Encoded,
    Frame,
    decode,
    encode,
    fresh_buffer,
)
from statehost.wire._messages import (
    CallReply,
    CallRequest,
    GetReply,
    GetRequest,
    Message,
    PullReply,
    PullRequest,
    PushReply,
    PushRequest,
    PutReply,
    PutRequest,
    RegisterReply,
    RegisterRequest,
    is_state_id,
)
from statehost.wire._pickle import (
    Section,
    StateRecord,
    StateRef,
    StateValue,
    pack,
    state_ref,
    unpack,
)
from statehost.wire._versions import PROTOCOL, local_versions, version_problems

__all__ = [
    "CONTENT_TYPE",
    "ERROR_KINDS",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_DEPTH",
    "PROTOCOL",
    "CallReply",
    "CallRequest",
    "Encoded",
    "ErrorKind",
    "Frame",
    "GetReply",
    "GetRequest",
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
    "encode",
    "fresh_buffer",
    "is_state_id",
    "local_versions",
    "pack",
    "state_ref",
    "unpack",
    "version_problems",
]
