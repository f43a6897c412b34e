"""The call stream's own messages: one ordered, full-duplex channel per client.

A client that dispatches asynchronously opens one WebSocket (``/v1/stream``)
and sends frames on it, each one message of ``statehost.wire``, in the order
the user issued them; the server runs them in that order and answers each on
the same channel. The messages are the HTTP endpoints' (``CallRequest``,
``PullRequest``) plus these:

=================  ==============  =============================================
request            reply           what it does
=================  ==============  =============================================
``FetchRequest``   ``FetchReply``  host copies of arrays kept on the server
``FreeRequest``    none            drops arrays kept on the server
``ControlRequest`` none            ``cancel`` calls not started (at once, out of
                                   order); ``resume`` after a failure (in order)
(any)              ``ErrorReply``  the request's error, as HTTP's error body
=================  ==============  =============================================

A WebSocket message holds one frame, or several laid end to end (``decode_all``
reads both): the server sends replies that are ready together in one message, and
the client requests it issued while many were unanswered. Every request carries a
``call_id`` (the client's, unique in its session), and its reply carries it back.
After a call fails, the server answers the calls queued behind it with
``CallNotRunError`` until the client sends ``resume`` (which it does once it has
raised the failure to the user), so nothing runs on states a failed call was meant
to change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import ClassVar

from statehost.wire._messages import Flags, Json, Message, Names
from statehost.wire._pickle import Section

__all__ = ["ControlRequest", "ErrorReply", "FetchReply", "FetchRequest", "FreeRequest",
           "handle_name", "outputs_signature"]


def handle_name(call_id: str, leaf: int) -> str:
    """The name of output leaf ``leaf`` of call ``call_id`` kept on the server."""
    return f"{call_id}:{leaf}"


def outputs_signature(leaves: Iterable[tuple[tuple[int, ...], str, bool] | str]) -> str:
    """A call's outputs in one short string: ``"float32[8,4]w;int32[]"``.

    Each leaf is ``(shape, dtype name, weak type)`` for an array, or a type name for
    anything else. The client predicts it (``CallRequest.expect``) from the first call
    of a signature; the server compares it with what the call returned.
    """
    parts = []
    for leaf in leaves:
        if isinstance(leaf, str):
            parts.append(leaf)
        else:
            shape, dtype, weak = leaf
            parts.append(f"{dtype}[{','.join(map(str, shape))}]{'w' if weak else ''}")
    return ";".join(parts)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FetchRequest(Message):
    """The host copies of these kept arrays (``handle_name``s)."""

    kind: ClassVar[str] = "fetch"
    session: str
    call_id: str
    handles: Names


@dataclasses.dataclass(frozen=True, kw_only=True)
class FetchReply(Message):
    """``values``: a list of numpy arrays, one per handle, and their weak types."""

    kind: ClassVar[str] = "fetch-reply"
    call_id: str
    weak_types: Flags = ()
    values: Section


@dataclasses.dataclass(frozen=True, kw_only=True)
class FreeRequest(Message):
    """Drops these kept arrays; unknown names are ignored (already dropped)."""

    kind: ClassVar[str] = "free"
    session: str
    handles: Names


@dataclasses.dataclass(frozen=True, kw_only=True)
class ControlRequest(Message):
    """``op`` is ``"cancel"`` (the calls ``ids`` that have not started: dropped, and a
    running one asked to stop between steps) or ``"resume"`` (run calls again after a
    failure)."""

    kind: ClassVar[str] = "control"
    session: str
    op: str
    ids: Names = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class ErrorReply(Message):
    """The request ``call_id`` failed: ``status`` and ``error`` as an HTTP answer has them
    (``{"type", "message", "traceback"?, ...}``). ``call_id`` is null when the frame that
    failed could not be read far enough to know it."""

    kind: ClassVar[str] = "error"
    call_id: str | None = None
    status: int
    error: Json
