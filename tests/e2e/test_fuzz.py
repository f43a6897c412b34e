"""The adversarial suite: hypothesis against the binary endpoints of one real ``statehost serve``.

Three strategies attack ``POST /v1/call``, ``/v1/states/push``, ``/v1/states/pull``,
``/v1/objects/put``, ``/v1/objects/get`` and ``/v1/functions/register``:

1. valid frames of every message kind, built with the typed messages, then mutated:
   bytes flipped, the body truncated, a header field replaced by random JSON of any
   type (or dropped), the sections' layout changed, sections swapped between messages,
   pickles replaced by random bytes or by pickles of random Python values (odd numpy
   dtypes, huge broadcast views, tuples of the wrong arity, ``StateRecord``s with wrong
   field types or other sessions' ids), and frames sent to another kind's endpoint;
2. headers nested deeply, inside fields or as the whole header;
3. random bodies, with and without a valid preamble.

Every answer must be below 500 and, unless it is a 2xx frame, the one JSON error shape
``{"error": {"type", "message", "traceback"?}}`` with a type from ``ERROR_KINDS`` and
that kind's status. The frames never name the resident state (put there by a normal
call of the client, whose session they use), so after each strategy the resident must
still hold its value, ``/v1/health`` must answer and a normal call must work.
``pytest -s`` prints one line with the frames sent and the 5xx seen.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import json
import struct
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import statehost
from statehost.random import RandomState
from statehost.wire import (
    CONTENT_TYPE,
    ERROR_KINDS,
    MAX_HEADER_DEPTH,
    CallRequest,
    GetRequest,
    PullRequest,
    PullReply,
    PushRequest,
    PutRequest,
    RegisterRequest,
    Section,
    StateRecord,
    decode,
    encode,
    pack,
)
from tests.serving import Served, running_server

pytestmark = pytest.mark.adversarial

PATHS = {
    "call": "/v1/call",
    "push": "/v1/states/push",
    "pull": "/v1/states/pull",
    "put": "/v1/objects/put",
    "get": "/v1/objects/get",
    "register": "/v1/functions/register",
}
KINDS = tuple(PATHS)
SECTION_NAMES = ("function", "args", "states", "structure", "results")

# derandomize: CI replays the same examples; no example database is written.
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


# -- the server, its resident state, and the raw connection -------------------------------
class Wire:
    """One kept-alive connection for raw frames (a new one only after the server closed it)."""

    def __init__(self, url: str, token: str):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port, self.token = parts.hostname, parts.port, token
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        self.conn.request("POST", path, body, {"content-type": CONTENT_TYPE,
                                               "authorization": f"Bearer {self.token}"})
        raw = self.conn.getresponse()
        data = raw.read()
        headers = {k.lower(): v for k, v in raw.getheaders()}
        if raw.will_close:
            self.close()
        return raw.status, headers, data

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class Tally:
    """What the fuzzer sent and saw, for the summary line and the reproducers."""

    sent: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    types: collections.Counter = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        ok = sum(n for s, n in self.statuses.items() if s < 300)
        return (f"fuzz: {self.sent} frames sent, {len(self.server_errors)} 5xx, {ok} 2xx; "
                f"statuses {dict(sorted(self.statuses.items()))}; "
                f"error types {dict(self.types.most_common())}")


@dataclass
class Resident:
    """The client's state that no fuzzed frame names: it must keep its value throughout."""

    state: statehost.ParamState
    step: Any  # a client.jit transform adding its argument (shape (4,)) to the state
    value: np.ndarray

    def assert_unchanged(self, client: Any) -> None:
        client.pull(self.state)
        np.testing.assert_array_equal(self.state.value, self.value)


@dataclass
class Target:
    """One server and what the fuzzer builds its valid frames from."""

    served: Served
    client: Any
    resident: Resident
    wire: Wire
    tally: Tally
    failures: Path
    session: str
    scratch: statehost.ParamState  # in the client's session; calls write it
    scratch_fn: Any  # packed client.jit of a function adding its argument to scratch
    stream: RandomState  # a RandomState of the client's session, for default_stream
    named: statehost.ParamState  # the state of object "fuzz/seed"
    named_fn: Any  # packed client.jit of a function of the named state, to register
    other_id: str  # a state of another session of the same token
    ids: list[str]  # every id a fuzzed frame may name (never the resident's)
    names: list[str]  # object names a fuzzed frame may name

    def send(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Posts ``body`` and checks the answer's status and shape (see the module doc)."""
        self.tally.sent += 1
        status, headers, data = self.wire.post(path, body)
        self.tally.statuses[status] += 1
        if status >= 500:
            saved = self.failures / f"5xx-{len(self.tally.server_errors)}.bin"
            saved.write_bytes(body)
            self.tally.server_errors.append(f"{path} -> {status} {data[:2000]!r} ({saved})")
            pytest.fail(f"POST {path} answered {status} (body saved in {saved}): "
                        f"{data[:4000].decode(errors='replace')}")
        if 200 <= status < 300:
            assert headers.get("content-type") == CONTENT_TYPE, (status, headers, data[:300])
            decode(data)
            return status, headers, data
        assert headers.get("content-type", "").startswith("application/json"), (status, data)
        body_json = json.loads(data)
        assert list(body_json) == ["error"], body_json
        error = body_json["error"]
        assert error["type"] in ERROR_KINDS, error
        assert ERROR_KINDS[error["type"]].status == status, (status, error)
        assert isinstance(error["message"], str) and error["message"], error
        assert isinstance(error.get("traceback", ""), str), error
        self.tally.types[error["type"]] += 1
        return status, headers, data


def _resident(client: Any) -> Resident:
    weight = statehost.ParamState(jnp.arange(4.0, dtype=jnp.float32), name="weight")

    def step(delta):
        weight.value = weight.value + delta
        return weight.value

    remote = client.jit(step)
    remote(jnp.full(4, 10.0, jnp.float32))
    return Resident(weight, remote, np.arange(4.0, dtype=np.float32) + 10)


def _adder(client: Any, state: statehost.State) -> Any:
    def add(delta):
        state.value = state.value + delta
        return state.value

    return client.jit(add)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with running_server(tmp) as served, \
            statehost.connect(served.url, token=served.token) as client, \
            statehost.connect(served.url, token=served.token) as other:
        resident = _resident(client)
        scratch = statehost.ParamState(jnp.zeros(4, jnp.float32), name="scratch")
        scratch_fn = _adder(client, scratch)
        scratch_fn(jnp.ones(4, jnp.float32))
        stream = RandomState(0, name="stream")
        client.push(stream)
        named = statehost.ParamState(jnp.ones(3, jnp.float32), name="named")
        client.put("fuzz/seed", named)
        named_fn = _adder(client, named)
        client.register("fuzz/fn", named_fn)
        elsewhere = statehost.ParamState(jnp.zeros(2, jnp.float32))
        other.push(elsewhere)
        ids = [scratch.id, stream.id, named.id, elsewhere.id, uuid.uuid4().hex,
               "0" * 32, "F" * 32, "not-an-id", ""]
        tally = Tally()
        failures = tmp / "failures"
        failures.mkdir()
        wire = Wire(served.url, served.token)
        yield Target(served, client, resident, wire, tally, failures, client._session,
                     scratch, scratch_fn.placement.packed(scratch_fn), stream, named,
                     named_fn.placement.packed(named_fn),
                     elsewhere.id, ids, ["fuzz/seed", "fuzz/fn", "fuzz/new", "nons/x", "fuzz",
                                         "", "fuzz/a/b", "../x", "fuzz/" + "n" * 300])
        wire.close()
        print(f"\n{tally.line()}")
        for line in tally.server_errors:
            print(f"  5xx: {line}")


def assert_still_serving(t: Target) -> None:
    """Health is 200, no 500 was logged, the resident kept its value and a call works."""
    served = t.served
    assert served.process.poll() is None, served.output()
    assert "unhandled error" not in served.output(), served.output()
    assert _get(served.url + "/v1/health") == 200
    t.resident.assert_unchanged(t.client)
    out = t.resident.step(jnp.ones(4, jnp.float32))
    t.resident.value = t.resident.value + 1
    np.testing.assert_array_equal(out, t.resident.value)


def _get(url: str) -> int:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", parts.path)
        raw = conn.getresponse()
        raw.read()
        return raw.status
    finally:
        conn.close()


# -- valid frames ----------------------------------------------------------------------
_DTYPES = [np.float32, np.int32, np.bool_, np.float16, np.uint8, np.int64, np.complex64]


@st.composite
def _state_values(draw: Any) -> Any:
    """Values a state may validly hold: arrays of several dtypes and shapes, scalars, pytrees."""
    array = hnp.arrays(st.sampled_from(_DTYPES), hnp.array_shapes(min_dims=0, max_dims=2,
                                                                   min_side=0, max_side=3))
    return draw(st.one_of(array, st.floats(allow_nan=False, width=32),
                          st.dictionaries(st.sampled_from("abc"), array, max_size=2)))


@st.composite
def _fresh(draw: Any, t: Target) -> list[StateRecord]:
    """New states of the client's session, uploaded with base version null."""
    classes = st.sampled_from([statehost.ParamState, statehost.ShortTermState, statehost.State])
    return [StateRecord(draw(classes), uuid.uuid4().hex, draw(st.none() | st.text(max_size=5)),
                        None, draw(_state_values()))
            for _ in range(draw(st.integers(1, 2)))]


def _records(records: list[StateRecord]) -> Section:
    return pack(records, refs=False)


@st.composite
def valid_frames(draw: Any, t: Target, kind: str) -> bytes:
    """A frame the server accepts (when the server's state still allows it)."""
    if kind == "call":
        fresh = draw(st.lists(_fresh(t), max_size=1))
        uploads = [r for rs in fresh for r in rs]
        message = CallRequest(
            session=t.session, call_id=draw(st.none() | st.just(uuid.uuid4().hex[:16])),
            digest=t.scratch_fn.digest,
            refs=(t.scratch.id, *draw(st.lists(st.just(t.stream.id), max_size=1))),
            uploads={r.id: None for r in uploads},
            default_stream=draw(st.none() | st.just(t.stream.id)),
            pull=draw(st.booleans()),
            pull_ids=tuple(draw(st.lists(st.just(t.scratch.id), max_size=1))),
            function=t.scratch_fn.section if draw(st.booleans()) else None,
            args=pack(((np.ones(4, np.float32),), {})),
            states=_records(uploads) if uploads else None)
    elif kind == "push":
        records = draw(_fresh(t))
        message = PushRequest(session=t.session, uploads={r.id: None for r in records},
                              states=_records(records))
    elif kind == "pull":
        message = PullRequest(session=t.session, ids=tuple(draw(st.lists(
            st.sampled_from([t.scratch.id, t.stream.id, t.named.id]), min_size=1, max_size=3))))
    elif kind == "put":
        (record, *_) = draw(_fresh(t))
        state = record.to_state()
        message = PutRequest(session=t.session, name=f"fuzz/p{draw(st.integers(0, 20))}",
                             object_kind="state", paths={state.id: ""},
                             uploads={state.id: None}, structure=pack(state, oob=False),
                             states=_records([record]))
    elif kind == "get":
        message = GetRequest(session=t.session, name="fuzz/seed", pull=draw(st.booleans()))
    else:
        message = RegisterRequest(session=t.session, name="fuzz/fn",
                                  digest=t.named_fn.digest, refs=(t.named.id,),
                                  function=t.named_fn.section)
    return message.to_frame().to_bytes()


# -- mutations -------------------------------------------------------------------------
def _split(frame: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """``(header, preamble up to the header, the rest after it)`` of a well-formed frame."""
    (length,) = struct.unpack_from("<I", frame, 4)
    return json.loads(frame[8 : 8 + length]), frame[:4], frame[8 + length :]


def _with_header(frame: bytes, header: dict[str, Any]) -> bytes:
    _, magic, rest = _split(frame)
    head = json.dumps(header).encode()
    return magic + struct.pack("<I", len(head)) + head + rest


def _rebuild(header: dict[str, Any], sections: dict[str, Section]) -> bytes:
    """A frame of ``header`` (its versions kept) and ``sections`` (the layout recomputed)."""
    body = {k: v for k, v in header.items() if k not in ("versions", "sections")}
    frame = encode(body, sections).to_bytes()
    if "versions" in header:
        new, _, _ = _split(frame)
        new["versions"] = header["versions"]
        frame = _with_header(frame, new)
    return frame


def _json_values(t: Target) -> st.SearchStrategy:
    scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2, 10)
               | st.floats(allow_nan=True) | st.text(max_size=20) | st.sampled_from(t.ids)
               | st.sampled_from(t.names))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=6) | st.sampled_from(t.ids), inner, max_size=4), max_leaves=10)


class _Reduce:
    """Pickles as ``fn(*args)``: how a sender makes the server build a value on load."""

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.fn, self.args


def _hostile_specials() -> list[Any]:
    huge = (2**40,)
    return [
        _Reduce(np.broadcast_to, np.zeros(1, np.float32), huge),  # 4 TiB, no memory on load
        _Reduce(np.broadcast_to, np.zeros(1), (2**31, 2**31)),
        _Reduce(np.lib.stride_tricks.as_strided, np.zeros(1, np.float32), huge, (0,)),
        _Reduce(np.empty, (2**44,), np.uint8),  # 16 TiB: fails on load
        np.zeros((0, 3), np.float32),
        np.array([1, 2], dtype=object),
        np.array(["a", "bc"]),
        np.zeros(2, dtype=[("a", "<i4"), ("b", ">f8")]),
        np.arange(3, dtype=">f4"),
        np.zeros(2, np.longdouble),
        np.array(["2020-01-01"], dtype="datetime64[D]"),
        np.zeros(3, np.complex128),
        np.zeros((2, 2), np.float64)[:, 0],  # a non-contiguous view
        float("nan"), 2**100, -1, b"\x00" * 10, "s", (), (1,), (1, 2, 3), ((), {}, ()),
        ((1,), []), ([], {}), ((np.ones(4, np.float32),), {"x": 1}), {"a": 1}, [[]],
        statehost.State, int, Ellipsis, slice(1, 2), range(3), frozenset({1}),
    ]


def _odd_arrays() -> st.SearchStrategy:
    dtypes = st.sampled_from([np.float16, np.float64, np.complex64, np.int8, np.uint64,
                              np.bool_, np.int16, np.dtype(">i4"), np.dtype("U3"),
                              np.dtype("S2"), np.dtype("m8[s]")])
    return hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3))


def _python_values(t: Target) -> st.SearchStrategy:
    leaves = (st.none() | st.integers() | st.floats() | st.text(max_size=10)
              | st.binary(max_size=10) | _odd_arrays() | st.sampled_from(_hostile_specials()))
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.tuples(inner), st.tuples(inner, inner, inner),
        st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=3),
        _bad_records(t, inner)), max_leaves=6)


def _bad_records(t: Target, values: st.SearchStrategy) -> st.SearchStrategy:
    """``StateRecord``s with wrong field types, other sessions' ids, odd values."""
    classes = st.sampled_from([statehost.ParamState, statehost.State, RandomState, int, dict,
                               None, "ParamState"])
    ids = st.sampled_from(t.ids) | st.integers() | st.none() | st.text(max_size=33)
    texts = st.none() | st.text(max_size=5) | st.integers()
    return st.builds(StateRecord, classes, ids, texts, texts, values)


@st.composite
def _records_section(draw: Any, t: Target) -> tuple[Section, dict[str, Any]]:
    """A states section of ``StateRecord``s (listed in ``uploads``, so they get staged)."""
    values = _python_values(t) | _state_values()
    records = draw(st.lists(_bad_records(t, values), min_size=1, max_size=3))
    bases = {r.id: draw(st.none() | st.integers(0, 3)) for r in records
             if isinstance(r.id, str)}
    return pack(records, refs=False), bases


@st.composite
def mutated(draw: Any, t: Target, kind: str, frame: bytes) -> tuple[str, bytes]:
    """``(endpoint, body)``: ``frame`` changed by one mutation, perhaps flipped too."""
    path = PATHS[kind]
    frame_obj = decode(frame)
    header, sections = dict(frame_obj.header), dict(frame_obj.sections)
    how = draw(st.sampled_from(["flip", "truncate", "field", "drop", "layout", "swap",
                                "pickle", "records", "endpoint"]), label="mutation")
    if how == "flip":
        body = bytearray(frame)
        for pos in draw(st.lists(st.integers(0, len(body) - 1), min_size=1, max_size=4)):
            body[pos] ^= draw(st.integers(1, 255))
        return path, bytes(body)
    if how == "truncate":
        return path, frame[: draw(st.integers(0, len(frame) - 1))]
    if how in ("field", "drop"):
        key = draw(st.sampled_from(sorted(header)) | st.text(max_size=8), label="field")
        if how == "drop":
            header.pop(key, None)
        else:
            header[key] = draw(_json_values(t), label="value")
        return path, _with_header(frame, header)
    if how == "layout":
        header["sections"] = draw(st.dictionaries(
            st.sampled_from(SECTION_NAMES), st.lists(st.integers(-1, 6), min_size=0,
                                                     max_size=3), max_size=3))
        return path, _with_header(frame, header)
    if how == "swap":
        other_kind = draw(st.sampled_from(KINDS))
        donor = decode(draw(valid_frames(t, other_kind))).sections
        name = draw(st.sampled_from(SECTION_NAMES))
        if donor and draw(st.booleans()):
            sections[name] = donor[draw(st.sampled_from(sorted(donor)))]
        elif sections:
            a, b = draw(st.sampled_from(sorted(sections))), name
            sections[a], sections[b] = sections.get(b, sections[a]), sections[a]
        return path, _rebuild(header, sections)
    if how == "pickle":
        name = draw(st.sampled_from(sorted(sections) + list(SECTION_NAMES)))
        if draw(st.booleans()):
            section = Section(draw(st.binary(max_size=64)))
        else:
            section = pack(draw(_python_values(t), label="value"), refs=False)
        sections[name] = section
        if name == "function" and draw(st.booleans()):
            header["digest"] = hashlib.sha256(section.payload).hexdigest()
        return path, _rebuild(header, sections)
    if how == "records":
        sections["states"], bases = draw(_records_section(t))
        header["uploads"] = bases
        if kind == "put":
            header["paths"] = {i: "" for i in bases}
        return path, _rebuild(header, sections)
    return PATHS[draw(st.sampled_from(KINDS))], frame


# -- 1. mutated valid frames -----------------------------------------------------------
@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_valid_frames_are_accepted(target, data):
    """The control: unmutated frames of every kind get a 2xx, or a 4xx the state explains."""
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    status, _, body = target.send(PATHS[kind], data.draw(valid_frames(target, kind)))
    assert status == 200, body[:2000]


@settings(FUZZ, max_examples=1800)
@given(data=st.data())
def test_mutated_frames(target, data):
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    frame = data.draw(valid_frames(target, kind))
    path, body = data.draw(mutated(target, kind, frame))
    target.send(path, body)
    if data.draw(st.booleans(), label="and flipped"):
        flipped = bytearray(body or b"\x00")
        flipped[data.draw(st.integers(0, len(flipped) - 1))] ^= 0xFF
        target.send(path, bytes(flipped))


def test_resident_survives_mutated_frames(target):
    assert_still_serving(target)


# -- 2. deeply nested headers ----------------------------------------------------------
def _nested(depth: int, leaf: str, openers: str) -> str:
    """``leaf`` inside ``depth`` arrays or objects, cycling through ``openers``."""
    parts = [openers[i % len(openers)] for i in range(depth)]
    head = "".join("[" if p == "[" else '{"k":' for p in parts)
    tail = "".join("]" if p == "[" else "}" for p in reversed(parts))
    return head + leaf + tail


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_deeply_nested_headers(target, data):
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    frame = data.draw(valid_frames(target, kind))
    header, magic, rest = _split(frame)
    depth = data.draw(st.sampled_from([MAX_HEADER_DEPTH - 1, MAX_HEADER_DEPTH,
                                       MAX_HEADER_DEPTH + 1, 100, 10_000, 200_000]) |
                      st.integers(1, 64), label="depth")
    leaf = data.draw(st.sampled_from(['"' + target.scratch.id + '"', "1", "null", '"[{"',
                                      "{}", "[]"]))
    nested = _nested(depth, leaf, data.draw(st.sampled_from(["[", "{", "[{", "{["])))
    if data.draw(st.booleans(), label="whole header"):
        head = nested.encode()
    else:
        key = data.draw(st.sampled_from(sorted(header)) | st.just("extra"), label="field")
        text = json.dumps({**header, key: "\x00SLOT\x00"})
        head = text.replace('"\\u0000SLOT\\u0000"', nested).encode()
    target.send(PATHS[kind], magic + struct.pack("<I", len(head)) + head + rest)


def test_resident_survives_nested_headers(target):
    assert_still_serving(target)


# -- 3. random bodies ------------------------------------------------------------------
@st.composite
def random_bodies(draw: Any) -> bytes:
    how = draw(st.sampled_from(["bytes", "preamble", "frame"]))
    if how == "bytes":
        return draw(st.binary(max_size=256))
    if how == "preamble":
        length = draw(st.integers(0, 2**32 - 1) | st.integers(0, 64))
        return b"SHF1" + struct.pack("<I", length) + draw(st.binary(max_size=128))
    head = draw(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
    buffers = draw(st.lists(st.binary(max_size=32), max_size=3))
    body = b"SHF1" + struct.pack("<I", len(head)) + head + struct.pack("<I", len(buffers))
    for buf in buffers:
        size = draw(st.just(len(buf)) | st.integers(0, 2**64 - 1))
        body += struct.pack("<Q", size) + buf
    return body


@settings(FUZZ, max_examples=600)
@given(kind=st.sampled_from(KINDS), body=random_bodies())
def test_random_bodies(target, kind, body):
    target.send(PATHS[kind], body)


def test_resident_survives_random_bodies(target):
    assert_still_serving(target)


def test_pulled_values_of_fuzzed_states_still_decode(target):
    """The fuzzed session's other states still answer a pull with frames that load."""
    frame = PullRequest(session=target.session, ids=(target.stream.id,)).to_frame().to_bytes()
    status, _, data = target.send(PATHS["pull"], frame)
    assert status == 200
    PullReply.from_frame(decode(data)).states.load()
