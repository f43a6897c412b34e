"""Hypothesis against the call stream: mutated frames on ``/v1/stream``, in process.

Valid messages of every kind the stream takes (calls, pulls, fetches, frees, controls)
are built with the typed messages, then mutated: bytes flipped, the frame truncated, a
header field replaced by random JSON (or dropped), and random bytes sent whole. Every
answer must be a frame: a reply, or an ``ErrorReply`` below 500 with a kind of
``ERROR_KINDS`` and that kind's status; or the channel closes with a code that says why
(1003, 1007, 1008, 1009). The frames never name the resident state, so it keeps its
value, and the normal client goes on working.
"""

from __future__ import annotations

import json
import queue
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import statehost
from statehost._errors import WireError
from statehost.wire import (
    ERROR_KINDS,
    MAGIC,
    CallRequest,
    ControlRequest,
    ErrorReply,
    FetchRequest,
    FreeRequest,
    PullRequest,
    decode,
    decode_all,
    pack,
)
from tests.inprocess import TOKEN

_CLOSE_CODES = {1003, 1007, 1008, 1009}
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)


@pytest.fixture
def resident(async_client):
    weight = statehost.ParamState(jnp.arange(4.0), name="resident")
    step = async_client.jit(lambda: weight.value * 2)
    step()
    async_client.sync()
    return weight, step


def _valid_frames(session, other):
    args = pack(((), {}))
    return [
        CallRequest(session=session, call_id="fuzz-call", digest="0" * 64, refs=(other,),
                    keep_outputs=True, returns="none", args=args),
        PullRequest(session=session, call_id="fuzz-pull", ids=(other,)),
        FetchRequest(session=session, call_id="fuzz-fetch", handles=("nope:0",)),
        FreeRequest(session=session, handles=("nope:0",)),
        ControlRequest(session=session, op="resume"),
        ControlRequest(session=session, op="cancel", ids=("fuzz-call",)),
    ]


def _replace_field(data: bytes, field: str, value) -> bytes:
    frame = decode(data)
    header = dict(frame.header)
    if value is _DROP:
        header.pop(field, None)
    else:
        header[field] = value
    head = json.dumps(header).encode()
    length = struct.unpack_from("<I", data, 4)[0]
    return data[:4] + struct.pack("<I", len(head)) + head + data[8 + length:]


_DROP = object()
_COUNTS = {"sent": 0, "closed": 0, "errors": 0}


@st.composite
def _mutations(draw, frames):
    data = draw(st.sampled_from(frames))
    how = draw(st.sampled_from(["flip", "truncate", "field", "random", "preamble"]))
    if how == "flip":
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        return bytes(data)
    if how == "truncate":
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "field":
        field = draw(st.sampled_from(["kind", "session", "call_id", "ids", "handles", "op",
                                      "digest", "refs", "returns", "timeout", "expect",
                                      "keep_outputs", "versions", "sections"]))
        return _replace_field(data, field, draw(_JSON | st.just(_DROP)))
    if how == "preamble":
        return MAGIC + draw(st.binary(max_size=64))
    return draw(st.binary(max_size=256))


class _Channel:
    """A raw stream connection, opened again whenever the server closed it."""

    def __init__(self, transport):
        self.transport = transport
        self.conn = None
        self.sent = self.closed = 0

    def send(self, data: bytes) -> list:
        if self.conn is None:
            self.conn = self.transport.open_stream(
                "/v1/stream", {"authorization": f"Bearer {TOKEN}"})
        self.conn.send(data)
        self.sent += 1
        # A marker request with a known reply: everything before it has been answered.
        marker = FetchRequest(session="0" * 32, call_id="marker", handles=("x:0",))
        self.conn.send(marker.to_frame().to_bytes())
        answers = []
        while True:
            try:
                message = self.conn.recv(timeout=20)
            except queue.Empty:
                pytest.fail(f"no answer within 20 s after sending {data[:300]!r}")
            if message is None:
                assert self.conn.close_code in _CLOSE_CODES, self.conn.close_code
                self.conn, self.closed = None, self.closed + 1
                return answers
            # Replies ready together come in one message, frames end to end.
            for frame in decode_all(message):
                if frame.header.get("call_id") == "marker":
                    return answers
                answers.append(frame)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_stream_frames_get_4xx_answers_or_a_closing_code(async_client, transport,
                                                                 resident, data):
    weight, step = resident
    session = async_client._session
    other = "f" * 32  # never the resident state
    frames = [m.to_frame().to_bytes() for m in _valid_frames(session, other)]
    channel = getattr(transport, "_fuzz_channel", None) or _Channel(transport)
    transport._fuzz_channel = channel
    answers = channel.send(data.draw(_mutations(frames)))
    _COUNTS["sent"] += 1
    _COUNTS["closed"] = channel.closed
    _COUNTS["errors"] += sum(f.header.get("kind") == ErrorReply.kind for f in answers)
    for frame in answers:
        if frame.header.get("kind") != ErrorReply.kind:
            continue
        try:
            reply = ErrorReply.from_frame(frame)
        except WireError as exc:
            pytest.fail(f"an answer that is not a well-formed ErrorReply: {exc}")
        kind = ERROR_KINDS.get(reply.error.get("type"))
        assert kind is not None and kind.status == reply.status < 500, reply


def test_after_the_fuzz_the_resident_state_is_unchanged_and_calls_work(async_client,
                                                                         transport, resident):
    weight, step = resident
    channel = _Channel(transport)
    for garbage in (b"", b"SHF1", b"\x00" * 64, MAGIC + b"\xff" * 12):
        channel.send(garbage)
    np.testing.assert_array_equal(np.asarray(step()), np.arange(4.0) * 2)
    async_client.pull(weight)
    np.testing.assert_array_equal(np.asarray(weight.value), np.arange(4.0))


def test_the_fuzz_reached_the_server():
    """Runs after the fuzz: its frames were answered with errors, and some closed the
    channel (``pytest -s`` prints the counts)."""
    print(f"stream fuzz: {_COUNTS}")
    assert _COUNTS["sent"] >= 100 and _COUNTS["errors"] > 0 and _COUNTS["closed"] > 0
