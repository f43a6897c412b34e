"""The adversarial suite: hypothesis against the binary endpoints of one real ``statehost serve``.

Three strategies attack ``POST /v1/call``, ``/v1/states/push``, ``/v1/states/pull``,
``/v1/objects/put``, ``/v1/objects/get``, ``/v1/functions/register`` and ``/v1/jobs``
(a loop: its ``steps``, ``keep``, ``timeout``, ``call_id`` and ``over`` get their own
strategy too):

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
that kind's status. A job ``POST /v1/jobs`` accepted (202, the job as JSON) runs in the
background: the fuzzer cancels a long one, waits for its ``end`` event, and holds its
result (``GET /v1/jobs/{id}/result``) to the same rule. The frames never name the
resident state (put there by a normal call of the client, whose session they use), so
after each strategy the resident must still hold its value, ``/v1/health`` must answer
and a normal call must work. ``pytest -s`` prints one line with the frames sent, the 5xx
seen and how the jobs ended.
"""

from __future__ import annotations

import collections
import copy
import hashlib
import http.client
import io
import json
import pickle
import re
import struct
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
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
    KEEP,
    MAX_HEADER_DEPTH,
    CallRequest,
    GetRequest,
    LoopRequest,
    PullReply,
    PullRequest,
    PushRequest,
    PutRequest,
    RegisterRequest,
    Section,
    StateRecord,
    StateRef,
    decode,
    encode,
    pack,
)
from tests.serving import Served, running_server

pytestmark = [pytest.mark.adversarial, pytest.mark.long(seconds=185)]

PATHS = {
    "call": "/v1/call",
    "push": "/v1/states/push",
    "pull": "/v1/states/pull",
    "put": "/v1/objects/put",
    "get": "/v1/objects/get",
    "register": "/v1/functions/register",
    "loop": "/v1/jobs",
}
KINDS = tuple(PATHS)
# An accepted job of more steps than this is cancelled at once (the fuzzer waits for its end).
_LONG_LOOP = 20
_JOB_ID = re.compile(r"[0-9a-f]{16,32}")
_JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled")
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
        self.reconnects = 0

    def post(self, path: str, body: bytes, method: str = "POST"
             ) -> tuple[int, dict[str, str], bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            try:
                self.conn.request(method, path, body, {
                    "content-type": CONTENT_TYPE, "authorization": f"Bearer {self.token}"})
                raw = self.conn.getresponse()
                break
            except (ConnectionError, http.client.RemoteDisconnected):
                # The server closed the kept-alive connection (its keep-alive timeout).
                self.close()
                self.reconnects += 1
                if attempt:
                    raise
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
    jobs: collections.Counter = field(default_factory=collections.Counter)  # by final status
    faults: collections.Counter = field(default_factory=collections.Counter)
    unknown: list[str] = field(default_factory=list)

    def line(self) -> str:
        ok = sum(n for s, n in self.statuses.items() if s < 300)
        fives = sum(n for s, n in self.statuses.items() if s >= 500)
        return (f"fuzz: {self.sent} frames sent, {fives} 5xx "
                f"({len(self.faults)} distinct causes), {ok} 2xx; "
                f"statuses {dict(sorted(self.statuses.items()))}; "
                f"jobs {dict(sorted(self.jobs.items()))}")


@dataclass
class Resident:
    """The client's state that no fuzzed frame names: it must keep its value throughout."""

    state: statehost.ParamState
    step: Any  # a RemoteMapping adding its argument (shape (4,)) to the state
    value: np.ndarray

    def assert_unchanged(self, client: Any) -> None:
        client.pull(self.state)
        np.testing.assert_array_equal(self.state.value, self.value)


@dataclass(repr=False, eq=False)
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
    ids: list[str]  # every id a fuzzed frame may name (never the resident's), another
    # session's state among them
    names: list[str]  # object names a fuzzed frame may name
    victim: statehost.ParamState  # in the client's session; the misbehaving calls use it
    hostile: dict[str, dict[str, Section]]  # "call" (of victim) / "register" (of named):
    # transforms of functions that misbehave, by name
    transforms: dict[str, list[Any]]  # the same keys: real transforms to tamper with
    log_offset: int = 0
    last_job: str = ""  # how the last job accepted ended

    def __repr__(self) -> str:
        return f"Target({self.served.url})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # Hypothesis prints strategies' arguments, and a dataclass field by field: a changing
        # and 30 kB long text that made its generation look flaky.
        printer.text(repr(self))

    def send(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        """Posts ``body`` and checks the answer's status and shape (see the module doc)."""
        self.tally.sent += 1
        try:
            status, headers, data = self.wire.post(path, body)
        except (ConnectionError, http.client.HTTPException) as exc:
            self.fault(f"POST {path}", body, f"no answer ({type(exc).__name__}: {exc})")
        self.tally.statuses[status] += 1
        self.check(f"POST {path}", body, status, headers, data)
        if path == PATHS["loop"] and 200 <= status < 300:
            self.settle(json.loads(data))
        return status, headers, data

    def check(self, request: str, body: bytes, status: int, headers: dict[str, str],
              data: bytes) -> None:
        """An answer is below 500, and a 2xx frame (a job: its JSON) or one JSON error.

        The one 5xx a request may earn is 507 ``DeviceMemoryError``: a program that needs
        more device memory than there is (the hostile ``huge``), which issue 13 answers so:
        it names a resource the server lacks, not a fault of the server's."""
        if status >= 500 and not (status == 507 and b'"DeviceMemoryError"' in data[:200]):
            self.fault(request, body, f"{status} {data[:600]!r}")
            return
        if request == f"POST {PATHS['loop']}" and status == 202:
            assert headers.get("content-type") == "application/json", (headers, data[:300])
            job = json.loads(data)
            assert _JOB_ID.fullmatch(job["id"]) and job["status"] in _JOB_STATUSES, job
            return
        if 200 <= status < 300:
            assert headers.get("content-type") == CONTENT_TYPE, (status, headers, data[:300])
            decode(data)
            return
        assert headers.get("content-type", "").startswith("application/json"), (status, data)
        body_json = json.loads(data)
        assert list(body_json) == ["error"], body_json
        error = body_json["error"]
        assert error["type"] in ERROR_KINDS, error
        assert ERROR_KINDS[error["type"]].status == status, (status, error)
        assert isinstance(error["message"], str) and error["message"], error
        assert isinstance(error.get("traceback", ""), str), error

    def settle(self, job: dict[str, Any]) -> None:
        """Lets an accepted job end (cancelled if long) and checks its result's answer."""
        where = f"{PATHS['loop']}/{job['id']}"
        if job["steps"] > _LONG_LOOP:
            self.wire.post(f"{where}/cancel", b"")
        status, _, events = self.wire.post(f"{where}/events", b"", "GET")
        assert status == 200 and b"\nevent: end\n" in b"\n" + events, (status, events[-600:])
        end = json.loads(events.rsplit(b"event: end\ndata: ", 1)[1])
        assert end["status"] in ("completed", "failed", "cancelled"), end
        self.tally.jobs[end["status"]] += 1
        self.last_job = end["status"]
        status, headers, data = self.wire.post(f"{where}/result", b"", "GET")
        self.check(f"GET {where}/result", json.dumps(job).encode(), status, headers, data)
        assert (status == 200) == (end["status"] == "completed"), (status, end, data[:600])

    def fault(self, request: str, body: bytes, answer: str) -> None:
        """A 5xx or a dropped connection: an open fault is tallied, anything else fails."""
        cause = server_fault(self.served, self.log_offset)
        self.log_offset = self.served.log.stat().st_size
        bug = next((name for name, fault in FAULTS.items()
                    if fault.open and re.search(fault.cause, cause)), None)
        self.tally.faults[f"{bug} ({cause})" if bug else cause] += 1
        if bug is not None:
            return
        saved = self.failures / f"fault-{sum(self.tally.faults.values())}.bin"
        saved.write_bytes(body)
        self.tally.unknown.append(f"{request} -> {answer}; cause {cause}; body in {saved}")
        pytest.fail(f"{request} answered {answer}; the server's traceback ends in {cause}. "
                    f"The body is saved in {saved}.\n{self.served.output()[-6000:]}")


def server_fault(served: Served, offset: int) -> str:
    """The last traceback the server logged after ``offset``: ``Type: text @ file:function``.

    The frame named is the deepest one in statehost's own code (server/ or statehost/).
    """
    text = ""
    for _ in range(50):  # uvicorn logs an app's exception after it sent the 500
        text = served.output()[offset:]
        if "Traceback (most recent call last)" in text:
            break
        time.sleep(0.02)
    block = text.rsplit("Traceback (most recent call last)", 1)[-1]
    frames = re.findall(r'File "([^"]+)", line \d+, in (\S+)', block)
    ours = [(f, fn) for f, fn in frames if "/site-packages/" not in f
            and ("/server/" in f or "/statehost/" in f)]
    where = "{}:{}".format(*ours[-1]) if ours else "?"
    where = re.sub(r"^.*?/((server|statehost)/)", r"\1", where)
    lines = [ln for ln in block.splitlines() if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|"
                                                        r"Exit|Interrupt|Warning)\b", ln)]
    last = lines[-1][:160] if lines else (block.strip().splitlines() or ["no traceback"])[-1]
    # Positions, sizes and characters vary between examples of one cause.
    last = re.sub(r"position \d+|\d+ digits|'\\u[0-9a-f]{4}'", "…", last)
    return f"{last} @ {where}"


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


def _hostile_transforms(state: statehost.State) -> list[Any]:
    """Transforms of functions that misbehave in every way user code can, each using ``state``.

    Defined here, not at module level, so cloudpickle ships them by value.
    """
    from statehost.transform import jit, vmap

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("this exception cannot be printed")

    class Escape(BaseException):
        pass

    class BadRepr:
        def __repr__(self) -> str:
            raise RuntimeError("this object cannot be shown")

    def system_exit(x):
        raise SystemExit(3)

    def keyboard_interrupt(x):
        raise KeyboardInterrupt

    def base_exception(x):
        raise Escape("not an Exception")

    def unprintable(x):
        raise Unprintable()

    def surrogate_message(x):
        raise ValueError("bad text \ud800 here")

    def nan_attribute(x):
        error = ValueError("with attributes")
        error.payload = float("nan")
        raise error

    def write_text(x):
        state.value = "not an array"
        return x

    def write_none(x):
        state.value = None
        return x

    def write_tree(x):
        state.value = {"a": state.value, "b": [x, x]}
        return x

    def recurse(x):
        return recurse(x)

    def huge(x):
        return jnp.zeros((2**40,), jnp.float32) + x[0]

    def returns_state(x):
        return state

    def returns_text(x):
        return "text"

    def odd_outputs(x):
        return (x.astype(jnp.float16), {"k": [x.astype(jnp.bool_)]}, None, x.astype(jnp.int8))

    # Signatures a registered function's description must survive.
    def nan_default(x, scale=float("nan")):
        return state.value * 0 + x

    def big_default(x, big=10**5000):
        return state.value * 0 + x

    def bad_repr_default(x, d=BadRepr()):  # noqa: B008
        return state.value * 0 + x

    def odd_annotation(x: "\ud800 not text"):  # noqa: F722
        return state.value * 0 + x

    functions = [system_exit, keyboard_interrupt, base_exception, unprintable,
                 surrogate_message, nan_attribute, write_text, write_none, write_tree, recurse,
                 huge, returns_state, returns_text, nan_default, big_default,
                 bad_repr_default, odd_annotation, odd_outputs]
    return [jit(f) for f in functions] + [vmap(odd_outputs), vmap(write_tree, in_axes=None)]


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
        victim = statehost.ParamState(jnp.zeros(4, jnp.float32), name="victim")
        client.push(victim)
        own = {"call": (victim, scratch_fn), "register": (named, named_fn)}
        hostile, transforms = {}, {}
        for kind, (state, remote) in own.items():
            made = _hostile_transforms(state)
            hostile[kind] = {f"{type(h).__name__}:{h.origin_fun.__name__}": pack(h)
                             for h in made}
            transforms[kind] = [remote, *made[-3:]]
        tally = Tally()
        failures = tmp / "failures"
        failures.mkdir()
        wire = Wire(served.url, served.token)
        names = ["fuzz/seed", "fuzz/fn", "fuzz/new", "nons/x", "fuzz", "", "fuzz/a/b", "../x",
                 "fuzz/" + "n" * 300, "fuzz/\ud800", "\udfff/x"]
        yield Target(served, client, resident, wire, tally, failures, client._session,
                     scratch, scratch_fn.placement.packed(scratch_fn), stream, named,
                     named_fn.placement.packed(named_fn), ids, names,
                     victim, hostile, transforms)
        wire.close()
        print(f"\n{tally.line()}; {wire.reconnects} reconnects")
        for cause, count in tally.faults.most_common():
            print(f"  {count:5d} x {cause}")
        for line in tally.unknown:
            print(f"  unknown: {line}")


def assert_still_serving(t: Target) -> None:
    """The server runs, health is 200, the resident kept its value and a normal call works."""
    served = t.served
    assert served.process.poll() is None, served.output()
    assert httpx.get(served.url + "/v1/health", timeout=30).status_code == 200
    t.resident.assert_unchanged(t.client)
    out = t.resident.step(jnp.ones(4, jnp.float32))
    t.resident.value = t.resident.value + 1
    np.testing.assert_array_equal(out, t.resident.value)


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
            # Always sent: a cached callable is used whether or not the section travels.
            function=t.scratch_fn.section,
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
    elif kind == "loop":
        fresh = draw(st.lists(_fresh(t), max_size=1))
        uploads = [r for rs in fresh for r in rs]
        steps = draw(st.integers(1, 3), label="steps")
        message = LoopRequest(
            session=t.session, call_id=draw(st.none() | st.just(uuid.uuid4().hex[:16])),
            digest=t.scratch_fn.digest,
            refs=(t.scratch.id, *draw(st.lists(st.just(t.stream.id), max_size=1))),
            uploads={r.id: None for r in uploads},
            default_stream=draw(st.none() | st.just(t.stream.id)),
            pull=draw(st.booleans()),
            pull_ids=tuple(draw(st.lists(st.just(t.scratch.id), max_size=1))),
            function=t.scratch_fn.section, args=pack(draw(_loop_args(steps))),
            states=_records(uploads) if uploads else None, steps=steps,
            keep=draw(st.sampled_from(KEEP)), timeout=draw(st.none() | st.just(60.0)))
    else:
        message = RegisterRequest(session=t.session, name="fuzz/fn",
                                  digest=t.named_fn.digest, refs=(t.named.id,),
                                  function=t.named_fn.section)
    return message.to_frame().to_bytes()


def _loop_args(steps: int) -> st.SearchStrategy:
    """A loop's ``(args, kwargs, over)`` for the scratch adder: the delta fixed, or per step."""
    return st.sampled_from([((np.ones(4, np.float32),), {}, None),
                            ((), {}, np.ones((steps, 4), np.float32)),
                            ((), {"delta": np.ones(4, np.float32)}, None)])


# -- mutations -------------------------------------------------------------------------
# A position in a body, taken modulo its length: a frame's length can differ between runs
# of the same example (pickle memoizes equal strings only when they are one object), and
# hypothesis needs the same draws, with the same bounds, on every run.
_POSITIONS = st.integers(0, 2**20)


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


# Any code point, lone surrogates included (JSON carries them as \udxxx escapes).
_TEXT = st.text(st.characters(exclude_categories=()), max_size=20)

# JSON texts that a parser accepts but that stress what reads the values.
_RAW_JSON = [
    "1" * 5000, "-" + "9" * 4400, "1e400", "-1e400", "NaN", "Infinity", "-0.0", "1.5",
    '"\\ud800"', '"a\\udfffb"', '{"\\ud800": 1}', '"' + "x" * 100_000 + '"',
    "[" + "0," * 20_000 + "0]", '{"a": 1, "a": [1]}', "18446744073709551616", "-1",
    '["' + "0" * 32 + '", 1]', "true", "{}",
]


def _json_values(t: Target) -> st.SearchStrategy:
    scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2, 10)
               | st.floats(allow_nan=True) | _TEXT | st.sampled_from(t.ids)
               | st.sampled_from(t.names))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        _TEXT | st.sampled_from(t.ids), inner, max_size=4), max_leaves=10)


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
        _Reduce(sys.exit, 3),  # raises SystemExit on load
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


def _deep_pickle(depth: int) -> bytes:
    """A protocol-5 pickle of lists nested ``depth`` deep (too deep for the pickler to make)."""
    return b"\x80\x05" + b"]" * depth + b"a" * (depth - 1) + b"."


class _Ref:
    """Stands for a persistent reference, pickled as ``pid`` (see ``_pack_refs``)."""

    def __init__(self, pid: Any):
        self.pid = pid


class _RefPickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj.pid if isinstance(obj, _Ref) else None


def _pack_refs(value: Any) -> Section:
    """Pickles ``value`` with every ``_Ref`` in it as a persistent reference to its pid."""
    file = io.BytesIO()
    _RefPickler(file, protocol=5).dump(value)
    return Section(file.getvalue())


def _bad_refs(t: Target) -> st.SearchStrategy:
    """Persistent references: ``StateRef``s with any field wrong, or not ``StateRef`` at all."""
    ids = (st.sampled_from(t.ids) | st.binary(max_size=4) | st.integers() | st.none()
           | _TEXT | st.just([1]) | st.just(float("nan")))
    classes = st.sampled_from([statehost.ParamState, RandomState, int, None, "ParamState"])
    names = st.none() | _TEXT | st.integers()
    refs = st.builds(StateRef, ids, classes, names, names)
    return (refs | st.sampled_from([(t.scratch.id,), "x", None, 1, t.scratch.id])).map(_Ref)


def _odd_arrays() -> st.SearchStrategy:
    dtypes = st.sampled_from([np.float16, np.float64, np.complex64, np.int8, np.uint64,
                              np.bool_, np.int16, np.dtype(">i4"), np.dtype("U3"),
                              np.dtype("S2"), np.dtype("m8[s]")])
    return hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=3))


def _python_values(t: Target) -> st.SearchStrategy:
    leaves = (st.none() | st.integers() | st.floats() | _TEXT
              | st.binary(max_size=10) | _odd_arrays() | st.sampled_from(_hostile_specials()))
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.tuples(inner), st.tuples(inner, inner, inner),
        st.dictionaries(st.text(max_size=4) | st.integers(), inner, max_size=3),
        _bad_records(t, inner)), max_leaves=6)


def _bad_records(t: Target, values: st.SearchStrategy) -> st.SearchStrategy:
    """``StateRecord``s with at most one field of a wrong type, other sessions' ids, odd values."""
    good = {
        "cls": st.sampled_from([statehost.ParamState, statehost.State, RandomState,
                                statehost.HiddenState]),
        "id": st.sampled_from(t.ids[:5]) | st.uuids().map(lambda u: u.hex),
        "name": st.none() | _TEXT, "tag": st.none() | _TEXT, "value": values,
    }
    bad = {
        "cls": st.sampled_from([int, dict, None, "ParamState", StateRecord]),
        "id": st.sampled_from(t.ids[5:]) | st.integers() | st.none() | _TEXT,
        "name": st.integers() | st.binary(max_size=3), "tag": st.floats() | st.just([]),
        "value": values,
    }

    @st.composite
    def record(draw: Any) -> StateRecord:
        wrong = draw(st.sampled_from([None, *good]))
        return StateRecord(**{k: draw(bad[k] if k == wrong else good[k]) for k in good})

    return record()


@st.composite
def _records_section(draw: Any, t: Target) -> tuple[Section, dict[str, Any]]:
    """A states section of ``StateRecord``s (listed in ``uploads``, so they get staged)."""
    values = _state_values() | st.sampled_from(_hostile_specials()) | _python_values(t)
    records = draw(st.lists(_bad_records(t, values), min_size=1, max_size=3))
    bases = {r.id: draw(st.none() | st.integers(0, 3)) for r in records
             if isinstance(r.id, str)}
    return pack(records, refs=False), bases


@st.composite
def mutated(draw: Any, t: Target, kind: str) -> tuple[str, bytes]:
    """``(endpoint, body)``: a valid frame of ``kind`` changed by one mutation."""
    path = PATHS[kind]
    frame = draw(valid_frames(t, kind))
    frame_obj = decode(frame)
    header, sections = dict(frame_obj.header), dict(frame_obj.sections)
    how = draw(st.sampled_from(["flip", "truncate", "field", "raw", "drop", "layout", "swap",
                                "pickle", "records", "refs", "transform", "args",
                                "endpoint"]), label="mutation")
    if how == "flip":
        body = bytearray(frame)
        for pos in draw(st.lists(_POSITIONS, min_size=1, max_size=4)):
            body[pos % len(body)] ^= draw(st.integers(1, 255))
        return path, bytes(body)
    if how == "truncate":
        return path, frame[: draw(_POSITIONS) % len(frame)]
    if how in ("field", "drop"):
        key = draw(st.sampled_from(sorted(header)) | st.text(max_size=8), label="field")
        if how == "drop":
            header.pop(key, None)
        else:
            header[key] = draw(_json_values(t), label="value")
        return path, _with_header(frame, header)
    if how == "raw":
        key = draw(st.sampled_from([*sorted(header), "versions.protocol", "extra"]))
        literal = draw(st.sampled_from(_RAW_JSON), label="literal")
        if key == "versions.protocol":
            header["versions"] = {**header.get("versions", {}), "protocol": "\x00SLOT\x00"}
        else:
            header[key] = "\x00SLOT\x00"
        head = json.dumps(header).replace('"\\u0000SLOT\\u0000"', literal).encode()
        _, magic, rest = _split(frame)
        return path, magic + struct.pack("<I", len(head)) + head + rest
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
        how = draw(st.sampled_from(["bytes", "deep", "value"]))
        if how == "bytes":
            section = Section(draw(st.binary(max_size=64)))
        elif how == "deep":
            section = Section(_deep_pickle(draw(st.sampled_from([1000, 100_000, 1_000_000]))))
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
    if how == "refs":  # a pickle with persistent references that are not the server's
        value = draw(st.lists(_bad_refs(t) | _python_values(t), min_size=1, max_size=3))
        name = draw(st.sampled_from(["function", "args", "structure", "states"]))
        value = ((tuple(value),), {}) if name == "args" else value
        sections[name] = section = _pack_refs(value)
        header["digest"] = hashlib.sha256(section.payload).hexdigest()
        return path, _rebuild(header, sections)
    if how == "transform":  # a real transform of a misbehaving function, or one tampered with
        pool = "register" if kind == "register" else "call"
        if draw(st.booleans()):
            hostile = t.hostile[pool]
            section = hostile[draw(st.sampled_from(list(hostile)), label="hostile")]
        else:
            transform = copy.copy(draw(st.sampled_from(t.transforms[pool])))
            for key in draw(st.lists(st.sampled_from(sorted(vars(transform))), min_size=1,
                                     max_size=2), label="attributes"):
                if draw(st.booleans()):
                    transform.__dict__.pop(key, None)
                else:
                    transform.__dict__[key] = draw(_python_values(t))
            section = pack(transform)
        sections["function"] = section
        header["digest"] = hashlib.sha256(section.payload).hexdigest()
        header["refs"] = [s.id for s in section.states]
        return path, _rebuild(header, sections)
    if how == "args":  # well-formed (args, kwargs) of odd values
        args = draw(st.lists(_python_values(t), max_size=2).map(tuple))
        kwargs = draw(st.dictionaries(st.sampled_from(["delta", "x"]) | _TEXT | st.integers(),
                                      _python_values(t), max_size=2))
        value: Any = (args, kwargs)
        if kind == "loop":  # and an over of odd values, or of arrays with the wrong rows
            value = (args, kwargs, draw(_odd_over(header.get("steps", 1), t), label="over"))
        sections["args"] = pack(value, refs=False)
        return path, _rebuild(header, sections)
    return PATHS[draw(st.sampled_from(KINDS))], frame


def _odd_over(steps: Any, t: Target) -> st.SearchStrategy:
    rows = steps if type(steps) is int and 0 <= steps < 100 else 1
    arrays = st.builds(lambda n, tail: np.ones((n, *tail), np.float32),
                       st.sampled_from([0, max(rows - 1, 0), rows, rows + 1]),
                       st.sampled_from([(), (4,), (3,), (4, 4), (1, 4)]))
    return st.one_of(st.none(), arrays, st.lists(arrays, max_size=2).map(tuple),
                     st.dictionaries(_TEXT, arrays, max_size=2), _python_values(t),
                     st.just(np.ones((rows, 4), np.float16)), st.just(np.ones(rows, "U3")))


# -- faults found ----------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    """A server fault this suite found: its cause, a reproducer, and whether it is open.

    The fuzz tests tolerate an open fault (counted in the summary line); ``test_fault``
    replays each reproducer, as a strict xfail while the fault is open.
    """

    cause: str  # a regex over server_fault()'s "Type: text @ file:function"
    path: str
    body: Callable[[Target], bytes]
    open: str | None  # why it is still open and where the fix goes; None once fixed


def _call(t: Target, function: Section | None = None, args: Section | None = None) -> bytes:
    """A call of ``function`` (default: the scratch adder) in the fuzzed session."""
    function = function or t.scratch_fn.section
    return CallRequest(session=t.session, digest=hashlib.sha256(function.payload).hexdigest(),
                       refs=tuple(s.id for s in function.states), function=function,
                       args=args or pack(((np.ones(4, np.float32),), {}))).to_frame().to_bytes()


def _with_versions(frame: bytes, **versions: Any) -> bytes:
    header, _, _ = _split(frame)
    return _with_header(frame, {**header, "versions": {**header["versions"], **versions}})


def _huge_int_header(t: Target) -> bytes:
    frame = PullRequest(session=t.session, ids=(t.scratch.id,)).to_frame().to_bytes()
    _, magic, rest = _split(frame)
    head = b'{"kind": "pull", "session": ' + b"1" * 5000 + b"}"
    return magic + struct.pack("<I", len(head)) + head + rest


def _loop(t: Target, args: Any) -> bytes:
    """A loop of the scratch adder, 2 steps, whose args section holds ``args``."""
    return LoopRequest(session=t.session, digest=t.scratch_fn.digest, refs=(t.scratch.id,),
                       function=t.scratch_fn.section, args=pack(args, refs=False), steps=2
                       ).to_frame().to_bytes()


# A dict whose keys do not sort: jax.tree_util cannot flatten it.
_UNSORTABLE = {1: np.ones(4, np.float32), "a": np.ones(4, np.float32)}

FAULTS: dict[str, Fault] = {
    "huge-int-in-header": Fault(
        r"ValueError: Exceeds the limit .* integer string conversion.* @ statehost/wire/",
        PATHS["pull"], _huge_int_header, None),
    "surrogate-in-error": Fault(
        r"UnicodeEncodeError: .*surrogates not allowed @ server/errors\.py:_(api|unhandled)",
        PATHS["pull"],
        lambda t: PullRequest(session="\ud800", ids=(t.scratch.id,)).to_frame().to_bytes(), None),
    "nan-in-error": Fault(
        r"ValueError: Out of range float values are not JSON compliant @ server/errors\.py:_api",
        PATHS["pull"],
        lambda t: _with_versions(PullRequest(session=t.session, ids=(t.scratch.id,))
                                 .to_frame().to_bytes(), protocol=float("nan")), None),
    "bytes-in-error": Fault(
        r"TypeError: Object of type \w+ is not JSON serializable @ server/errors\.py:_api",
        PATHS["call"],
        lambda t: _call(t, args=_pack_refs(((_Ref(StateRef(b"id", statehost.ParamState, None,
                                                                None)),), {}))), None),
    "user-base-exception": Fault(
        r"^(SystemExit|KeyboardInterrupt|GeneratorExit|[\w.]*Escape)\b.* @ statehost/transform/",
        PATHS["call"], lambda t: _call(t, t.hostile["call"]["StatefulFunction:system_exit"]), None),
    "pickle-base-exception": Fault(
        r"^SystemExit\b.* @ statehost/wire/_pickle\.py",
        PATHS["call"], lambda t: _call(t, args=pack(_Reduce(sys.exit, 3), refs=False)), None),
    "deep-pickle-repr": Fault(
        r"RecursionError: .* @ server/staging\.py:_load_records",
        PATHS["push"],
        lambda t: PushRequest(session=t.session, states=Section(_deep_pickle(100_000)))
        .to_frame().to_bytes(), None),
    "register-unreprable-default": Fault(
        r"RuntimeError: this object cannot be shown @ server/registered\.py:_plain",
        PATHS["register"],
        lambda t: RegisterRequest(
            session=t.session, name="fuzz/badrepr", refs=(t.named.id,),
            digest=hashlib.sha256(t.hostile["register"]["StatefulFunction:bad_repr_default"]
                                  .payload).hexdigest(),
            function=t.hostile["register"]["StatefulFunction:bad_repr_default"])
        .to_frame().to_bytes(), None),
    "user-unprintable-exception": Fault(
        r"RuntimeError: this exception cannot be printed @ server/execution\.py:_user_error",
        PATHS["call"], lambda t: _call(t, t.hostile["call"]["StatefulFunction:unprintable"]), None),
    # The job failed as a ServerError (its result a 500): the loop's one-time placement of
    # its constant arguments, and its check of over's rows, flattened them outside the
    # step's error handling (server/loops.py).
    "loop-unflattenable-kwargs": Fault(
        r"ValueError: Comparator raised exception while sorting pytree dictionary keys",
        PATHS["loop"], lambda t: _loop(t, ((np.ones(4, np.float32),), {"d": _UNSORTABLE},
                                           None)), None),
    "loop-unflattenable-over": Fault(
        r"ValueError: Comparator raised exception while sorting pytree dictionary keys",
        PATHS["loop"], lambda t: _loop(t, ((), {}, _UNSORTABLE)), None),
}


# -- 1. mutated valid frames -----------------------------------------------------------
@settings(FUZZ, max_examples=120)
@given(data=st.data())
def test_valid_frames_are_accepted(target, data):
    """The control: the unmutated frames of every kind are accepted."""
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    status, _, body = target.send(PATHS[kind], data.draw(valid_frames(target, kind)))
    assert status == (202 if kind == "loop" else 200), body[:2000]
    if kind == "loop":
        assert target.last_job == "completed"


@settings(FUZZ, max_examples=1000)
@given(data=st.data())
def test_mutated_frames(target, data):
    kind = data.draw(st.sampled_from(KINDS), label="kind")
    path, body = data.draw(mutated(target, kind))
    target.send(path, body)
    if data.draw(st.booleans(), label="and flipped"):
        flipped = bytearray(body or b"\x00")
        flipped[data.draw(_POSITIONS) % len(flipped)] ^= 0xFF
        target.send(path, bytes(flipped))


def test_resident_survives_mutated_frames(target):
    assert_still_serving(target)


# Values for a loop's own header fields: the edges of their rules, and of what runs.
_ODD_LOOP_FIELDS = {
    "steps": [0, -1, 1, 2, 3, 4, _LONG_LOOP + 1, 10**9, 2**63, 10**30, 1.0, 2.5, True, "3",
              None, [], float("nan")],
    "keep": ["last", "all", "first", "", "LAST", None, 1, ["last"], "last\x00"],
    "timeout": [None, 1e-320, 0.001, 0.5, 60, 1e9, 1e9 + 1, 0, -0.0, -1, float("nan"),
                float("inf"), True, "1", 10**30],
    "call_id": [None, "ab" * 8, "ab" * 16, "AB" * 8, "ab" * 8 + "\n", "0" * 33, "", 1,
                "x" * 1000, "\ud800" * 16],
}


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_mutated_loop_fields(target, data):
    """``steps``, ``keep``, ``timeout``, ``call_id`` and ``over`` of a valid loop, changed."""
    frame = decode(data.draw(valid_frames(target, "loop")))
    header, sections = dict(frame.header), dict(frame.sections)
    how = data.draw(st.sampled_from(["fields", "over", "both", "long"]), label="mutation")
    if how == "long":  # a loop that runs until it is cancelled, or stopped by its timeout
        header["steps"] = data.draw(st.sampled_from([_LONG_LOOP + 1, 10**9, 2**63, 10**30]))
        header["timeout"] = data.draw(st.sampled_from(_ODD_LOOP_FIELDS["timeout"][:6]))
        sections["args"] = pack(((np.ones(4, np.float32),), {}, None))
        target.send(PATHS["loop"], _rebuild(header, sections))
        return
    fields = [] if how == "over" else data.draw(st.lists(st.sampled_from(
        sorted(_ODD_LOOP_FIELDS)), min_size=1, max_size=3, unique=True), label="fields")
    for key in fields:
        odd = st.sampled_from(_ODD_LOOP_FIELDS[key])
        header[key] = data.draw(st.one_of(odd, odd, odd, _json_values(target)), label=key)
    if how == "fields" and data.draw(st.booleans(), label="same delta each step"):
        sections["args"] = pack(((np.ones(4, np.float32),), {}, None))  # fits any steps
    elif how != "fields":
        sections["args"] = pack(((), {}, data.draw(_odd_over(header.get("steps"), target),
                                                   label="over")), refs=False)
    target.send(PATHS["loop"], _rebuild(header, sections))


def test_resident_survives_mutated_loops(target):
    assert_still_serving(target)
    assert target.tally.jobs["completed"] and target.tally.jobs["cancelled"], target.tally.jobs


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


def test_json_views_of_what_the_fuzzer_left(target):
    """Every state, object and function the fuzzed frames made is listed, described, read and
    flushed without a 5xx (the JSON API reads what the binary API wrote)."""
    headers = {"authorization": f"Bearer {target.served.token}"}
    with httpx.Client(base_url=target.served.url, headers=headers, timeout=60) as http:

        def get(path: str, **kwargs: Any) -> Any:
            method = kwargs.pop("method", "GET")
            response = http.request(method, path, **kwargs)
            if response.status_code >= 500:
                target.fault(f"{method} {path}", response.request.content,
                             f"{response.status_code} {response.text[:600]}")
            return response

        def q(name: str) -> str:  # fuzzed names may hold any code point, even surrogates
            return urllib.parse.quote(name.encode("utf-8", "surrogatepass"), safe="")

        namespaces = [n["name"] for n in get("/v1/namespaces").json()["namespaces"]]
        assert "fuzz" in namespaces
        for ns in namespaces:
            for state in get(f"/v1/namespaces/{ns}/states").json()["states"]:
                get(f"/v1/namespaces/{ns}/states/{q(state['name'])}")
                get(f"/v1/namespaces/{ns}/states/{q(state['name'])}/value")
                get(f"/v1/namespaces/{ns}/states/{q(state['name'])}/value",
                    headers={"accept": "application/x-npy"})
            for obj in get(f"/v1/namespaces/{ns}/objects").json()["objects"]:
                get(f"/v1/namespaces/{ns}/objects/{q(obj['name'])}")
            for fn in get(f"/v1/namespaces/{ns}/functions").json()["functions"]:
                name = fn["name"].split("/", 1)[1]
                get(f"/v1/namespaces/{ns}/functions/{q(name)}/invoke", method="POST",
                    json={"args": [[1.0, 2.0, 3.0]]})
            get(f"/v1/namespaces/{ns}/checkpoint", method="POST")
        get("/metrics")
    assert_still_serving(target)


def test_pulled_values_of_fuzzed_states_still_decode(target):
    """The fuzzed session's other states still answer a pull with frames that load."""
    frame = PullRequest(session=target.session, ids=(target.stream.id,)).to_frame().to_bytes()
    status, _, data = target.send(PATHS["pull"], frame)
    assert status == 200
    PullReply.from_frame(decode(data)).states.load()


# -- the faults found, one by one ------------------------------------------------------
@pytest.mark.parametrize("name", [
    pytest.param(name, marks=[pytest.mark.xfail(strict=True, reason=fault.open)]
                 if fault.open else [])
    for name, fault in FAULTS.items()])
def test_fault(target, name):
    """Each fault's reproducer gets a 4xx with the one error shape, and nothing changes."""
    fault = FAULTS[name]
    status, _, data = target.send(fault.path, fault.body(target))
    assert status < 500, data[:2000]
    assert_still_serving(target)
