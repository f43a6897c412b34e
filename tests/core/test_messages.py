"""Typed messages: round trips, and one clear WireError per malformed field."""

import numpy as np
import pytest

import statehost
from statehost.wire import (
    CallReply,
    CallRequest,
    PullRequest,
    PushRequest,
    PutRequest,
    RegisterReply,
    StateRecord,
    decode,
    encode,
    pack,
)

SID = "a" * 32
STATE = "b" * 32


def _round_trip(message):
    return type(message).from_frame(decode(message.to_frame().to_bytes()))


def test_call_request_round_trips_every_field():
    args = pack(((np.arange(3.0),), {}))
    sent = CallRequest(session=SID, call_id="c1", digest="d" * 64, refs=(STATE,),
                       uploads={STATE: None}, default_stream=STATE, pull=True,
                       pull_ids=(STATE,), args=args)
    got = _round_trip(sent)
    assert (got.session, got.call_id, got.digest, got.refs, got.uploads) == (
        SID, "c1", "d" * 64, (STATE,), {STATE: None})
    assert got.default_stream == STATE and got.pull and got.pull_ids == (STATE,)
    assert got.function is None and got.states is None
    (x,), kwargs = got.args.load()
    np.testing.assert_array_equal(x, np.arange(3.0)) and kwargs == {}


def test_optional_fields_take_their_defaults():
    got = _round_trip(PullRequest(session=SID, ids=()))
    assert got.ids == ()
    reply = _round_trip(RegisterReply(name="ns/f", digest="x"))
    assert reply.signature == {} and reply.state_ids == ()


def test_state_records_rebuild_states_with_their_identity():
    w = statehost.ParamState(np.ones(2), name="w", tag="t")
    record = StateRecord.of(w, np.zeros(2))
    section = pack([record], refs=False)
    got = _round_trip(PushRequest(session=SID, uploads={w.id: 3}, states=section))
    (back,) = got.states.load()
    state = back.to_state()
    assert type(state) is statehost.ParamState and state.id == w.id
    assert (state.name, state.tag) == ("w", "t") and got.uploads == {w.id: 3}
    np.testing.assert_array_equal(state.value, np.zeros(2))


def _frame(kind, sections=None, **header):
    return decode(encode({"kind": kind, **header}, sections).to_bytes())


@pytest.mark.parametrize("header, field, want", [
    ({"session": 5, "ids": []}, "session", "a string"),
    ({"ids": []}, "session", "missing"),
    ({"session": SID, "ids": None}, "ids", "a list of state ids"),
    ({"session": SID, "ids": [5]}, "ids", "a list of state ids"),
    ({"session": SID, "ids": ["../etc"]}, "ids", "a list of state ids"),
    ({"session": SID, "ids": "b" * 32}, "ids", "a list of state ids"),
])
def test_bad_pull_headers_name_the_field(header, field, want):
    with pytest.raises(statehost.WireError, match=f"PullRequest header field '{field}'") as info:
        PullRequest.from_frame(_frame("pull", **header))
    assert want in str(info.value)


@pytest.mark.parametrize("uploads", [5, [STATE], {STATE: "1"}, {STATE: -1}, {"x": 1},
                                     {STATE: True}])
def test_bad_upload_maps_are_refused(uploads):
    frame = _frame("push", {"states": pack([], refs=False)}, session=SID, uploads=uploads)
    with pytest.raises(statehost.WireError, match="'uploads' must be an object of state id"):
        PushRequest.from_frame(frame)


def test_missing_sections_and_wrong_kinds_are_refused():
    with pytest.raises(statehost.WireError, match="needs a 'args' section"):
        CallRequest.from_frame(_frame("call", session=SID, digest="d"))
    with pytest.raises(statehost.WireError, match="field 'kind' must be 'put'"):
        PutRequest.from_frame(_frame("call", session=SID))


def test_reply_sections_come_back():
    sent = CallReply(call_id="c", written=(STATE,), compiled=1, state_versions={STATE: 2},
                     results=pack([np.ones(2)], refs=False, code=False))
    got = _round_trip(sent)
    assert got.written == (STATE,) and got.state_versions == {STATE: 2} and got.compiled == 1
    np.testing.assert_array_equal(got.results.load()[0], np.ones(2))


def test_call_reply_weak_types_round_trip():
    sent = CallReply(call_id="c", weak_types=(True, False),
                     results=pack([np.ones(2), np.ones(3)], refs=False, code=False))

    assert _round_trip(sent).weak_types == (True, False)
    assert _round_trip(CallReply(call_id="c", results=sent.results)).weak_types == ()


@pytest.mark.parametrize("weak_types", [True, [1, 0], ["true"], {"0": True}])
def test_bad_weak_types_are_refused(weak_types):
    frame = _frame("call-reply", {"results": pack([], refs=False, code=False)}, call_id="c",
                   weak_types=weak_types)
    with pytest.raises(statehost.WireError,
                       match="CallReply header field 'weak_types' must be a list of true/false"):
        CallReply.from_frame(frame)
