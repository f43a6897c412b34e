"""Malformed frames the fuzzer found to answer 500: each is a 4xx naming the fault now,
and the resident state keeps its value."""

import json
import pickle
import struct
import urllib.parse

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.wire import (
    CONTENT_TYPE,
    MAGIC,
    CallRequest,
    PushRequest,
    StateRecord,
    encode,
    pack,
)
from tests.inprocess import TOKEN, URL


@pytest.fixture
def http(transport):
    with httpx.Client(base_url=URL, transport=transport,
                      headers={"authorization": f"Bearer {TOKEN}"}) as http:
        yield http


@pytest.fixture
def resident(client):
    """A state the client's session holds on the server (value 1, 1), and its step."""
    w = statehost.ParamState(jnp.ones(2), name="w")
    step = client.jit(lambda: w.value * 1)
    step()
    return w, step


def _stream(client):
    """The id of the client's stand-in for the default random stream (the callable cache
    is keyed on it)."""
    return client._stream_twin().state.id


def _post(http, path, body):
    return http.post(path, content=body, headers={"content-type": CONTENT_TYPE})


def _digest(step) -> str:
    """The digest of a client transform's pickle, as its calls send it."""
    return step.placement.packed(step).digest


def _header_frame(header: dict, sections=None) -> bytes:
    return encode(header, sections).to_bytes()


def _assert_4xx(response, kind, *fragments):
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["type"] == kind, error
    for fragment in fragments:
        assert fragment in error["message"], error["message"]


def _assert_unchanged(client, resident):
    w, step = resident
    np.testing.assert_array_equal(step(), np.ones(2))
    np.testing.assert_array_equal(w.value, np.ones(2))


def test_a_header_nested_100000_deep(http, client, resident):
    head = b"[" * 100_000 + b"]" * 100_000
    body = MAGIC + struct.pack("<I", len(head)) + head + struct.pack("<I", 0)
    _assert_4xx(_post(http, "/v1/call", body), "ProtocolError", "nests deeper than")
    _assert_unchanged(client, resident)


def test_a_section_layout_of_strings(http, client, resident):
    body = bytearray(_header_frame({"kind": "call"}))
    body = body.replace(b'"sections":{}', b'"sections":{"states":["0",1]}')
    body[4:8] = struct.pack("<I", len(body) - 12)
    _assert_4xx(_post(http, "/v1/call", bytes(body)), "ProtocolError", "do not fit 0 buffers")
    _assert_unchanged(client, resident)


def test_a_cached_function_with_no_args_section(http, client, resident):
    _, step = resident
    header = {"kind": "call", "session": client._session, "digest": _digest(step)}
    _assert_4xx(_post(http, "/v1/call", _header_frame(header)), "ProtocolError",
                "CallRequest needs a 'args' section")
    _assert_unchanged(client, resident)


@pytest.mark.parametrize("refs", [[5], None, "x", [["a"]]])
def test_refs_that_are_not_a_list_of_ids(http, client, resident, refs):
    _, step = resident
    header = {"kind": "call", "session": client._session, "digest": _digest(step),
              "refs": refs}
    body = _header_frame(header, {"args": pack(((), {}))})
    _assert_4xx(_post(http, "/v1/call", body), "ProtocolError",
                "CallRequest header field 'refs' must be a list of state ids")
    _assert_unchanged(client, resident)


def test_a_push_with_uploads_5(http, client, resident):
    header = {"kind": "push", "session": client._session, "uploads": 5}
    body = _header_frame(header, {"states": pack([], refs=False)})
    _assert_4xx(_post(http, "/v1/states/push", body), "ProtocolError",
                "PushRequest header field 'uploads'")
    _assert_unchanged(client, resident)


class _Broadcast:
    """Unpickles as a 1 TiB read-only broadcast view, which costs nothing until placed."""

    def __reduce__(self):
        return np.broadcast_to, (np.zeros(1, np.float32), (2**38,))


def test_a_terabyte_broadcast_value_is_refused_not_a_500(http, client, resident):
    w, _ = resident
    record = StateRecord(statehost.ParamState, w.id, "w", None, _Broadcast())
    message = PushRequest(session=client._session,
                          uploads=client._ledger.bases([w]),
                          states=pack([record], refs=False))
    _assert_4xx(_post(http, "/v1/states/push", message.to_frame().to_bytes()),
                "PayloadTooLargeError", "cannot be placed on the server's devices",
                "Nothing was committed")
    _assert_unchanged(client, resident)


def test_a_record_not_listed_in_uploads_is_refused(http, client, resident):
    """It would change a state whose lock the call does not hold."""
    w, _ = resident
    other = statehost.ParamState(jnp.zeros(2))
    records = [StateRecord.of(w, np.full(2, 9, np.float32))]
    message = PushRequest(session=client._session, uploads={other.id: None},
                          states=pack(records, refs=False))
    _assert_4xx(_post(http, "/v1/states/push", message.to_frame().to_bytes()),
                "ProtocolError", "which header.uploads does not list")
    _assert_unchanged(client, resident)


@pytest.mark.parametrize("records", [
    [(statehost.ParamState, "0" * 32, None, None, 1.0)],  # a plain tuple, not a record
    [StateRecord(int, "0" * 32, None, None, 1.0)],  # not a State class
    [StateRecord(statehost.ParamState, "../../etc", None, None, 1.0)],
    {"not": "a list"},
])
def test_malformed_state_records(http, client, resident, records):
    message = PushRequest(session=client._session, uploads={"0" * 32: None},
                          states=pack(records, refs=False))
    _assert_4xx(_post(http, "/v1/states/push", message.to_frame().to_bytes()),
                "ProtocolError", "must be a list of StateRecord")
    _assert_unchanged(client, resident)


def test_an_args_section_that_is_not_args_and_kwargs(http, client, resident):
    w, step = resident
    message = CallRequest(session=client._session, digest=_digest(step), refs=(w.id,),
                          default_stream=_stream(client), args=pack([1, 2, 3]))
    _assert_4xx(_post(http, "/v1/call", message.to_frame().to_bytes()), "ProtocolError",
                "the args section must hold (args tuple, kwargs dict)")
    _assert_unchanged(client, resident)


def test_a_foreign_persistent_id_is_refused(http, client, resident):
    w, step = resident

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("state", w.id) if obj is w else None

    import io

    file = io.BytesIO()
    Pickler(file, protocol=5).dump(((w,), {}))
    from statehost.wire import Section

    message = CallRequest(session=client._session, digest=_digest(step), refs=(w.id,),
                          default_stream=_stream(client), args=Section(file.getvalue()))
    _assert_4xx(_post(http, "/v1/call", message.to_frame().to_bytes()), "ProtocolError",
                "unknown persistent reference")
    _assert_unchanged(client, resident)


@pytest.mark.parametrize("name", ["..", "a\x00b", "a\u202eb", "x" * 5000, "-x", "a/b"])
def test_namespace_names_are_checked_on_every_route(http, name):
    quoted = "/v1/namespaces/" + urllib.parse.quote(name, safe="")
    response = http.put(quoted, json={"durability": "sync"})
    assert response.status_code in (404, 422), response.text
    listed = [n["name"] for n in http.get("/v1/namespaces").json()["namespaces"]]
    assert name not in listed
    for path in (f"{quoted}/objects", f"{quoted}/states", f"{quoted}/functions"):
        assert http.get(path).status_code in (404, 422)


def test_a_valid_namespace_name_is_accepted(http):
    response = http.put("/v1/namespaces/team-2.v1", json={"durability": "none"})
    assert response.status_code == 200, response.text
    assert json.loads(response.text) == {"namespace": "team-2.v1", "durability": "none"}
