"""Bad input against a real ``statehost serve``: a 4xx with a JSON error, and nothing lost.

Each test sends one kind of bad input (raw bytes over httpx, or the real
client) to a server subprocess and checks, as DESIGN.md "What bad input gets"
asks: the status and the JSON body ``{"error": {"type", "message",
"traceback"?}}``, a message that says what was wrong and how to fix it, a
server that still answers ``/v1/health`` and a normal call, and a resident
state (put there by an earlier successful call) that kept its value.

One server serves the whole module; a second one with ``--max-body 1MiB``
serves the oversized-body tests.
"""

import hashlib
import http.client
import importlib
import importlib.util
import json
import os
import struct
import sys
import urllib.parse
import uuid
from dataclasses import dataclass

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client import (
    AuthError,
    PayloadError,
    PayloadTooLargeError,
    RemoteExecutionError,
    StateNotFoundError,
)
from statehost.wire import CONTENT_TYPE, CallRequest, Section, StateRecord, local_versions, pack
from tests.serving import Served, running_server

SMALL_LIMIT = 2**20  # the second server's --max-body 1MiB


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server")) as served:
        yield served


@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    with running_server(
        tmp_path_factory.mktemp("small"), "--max-body", "1MiB", cpu_devices=2
    ) as served:
        yield served


@pytest.fixture(scope="module")
def client(server):
    with statehost.connect(server.url, token=server.token) as c:
        yield c


# -- a state the server holds, and the checks every test ends with -----------------
@dataclass
class Resident:
    """A state put on the server by a successful ``client.jit`` call, and that call."""

    state: statehost.ParamState
    step: object  # a client.jit transform: step(delta) adds delta (shape (4,)) to the state
    value: np.ndarray  # the value the server holds

    def assert_unchanged(self, client):
        client.pull(self.state)
        np.testing.assert_array_equal(self.state.value, self.value)


def make_resident(client) -> Resident:
    weight = statehost.ParamState(jnp.arange(4.0, dtype=jnp.float32), name="weight")

    def step(delta):
        weight.value = weight.value + delta
        return weight.value

    remote = client.jit(step)
    out = remote(jnp.full(4, 10.0, jnp.float32))
    expected = np.arange(4.0, dtype=np.float32) + 10
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(weight.value, expected)
    return Resident(weight, remote, expected)


@pytest.fixture
def resident(client):
    return make_resident(client)


def assert_still_serving(served: Served, client, resident: Resident) -> None:
    """Health is 200, the resident state kept its value, and a normal call works."""
    assert served.process.poll() is None, served.output()
    assert "unhandled error" not in served.output(), served.output()  # no 500 so far
    assert httpx.get(served.url + "/v1/health", timeout=10).status_code == 200
    resident.assert_unchanged(client)
    out = resident.step(jnp.ones(4, jnp.float32))
    np.testing.assert_array_equal(out, resident.value + 1)
    np.testing.assert_array_equal(resident.state.value, resident.value + 1)


def assert_error(response: httpx.Response, status: int, kind: str, *fragments: str) -> dict:
    """The response is ``status`` with the one JSON error shape; returns ``body["error"]``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert error["type"] == kind, error
    assert isinstance(error["message"], str), error
    assert isinstance(error.get("traceback", ""), str), error
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])
    return error


# -- raw requests ------------------------------------------------------------------
def post(served: Served, path: str, body: bytes, *, token: str | None = "same") -> httpx.Response:
    headers = {"content-type": CONTENT_TYPE}
    if token is not None:
        headers["authorization"] = f"Bearer {served.token if token == 'same' else token}"
    return httpx.post(served.url + path, content=body, headers=headers, timeout=30)


def call_frame(client, resident: Resident, *, refs=None, sections=None) -> bytes:
    """A valid ``POST /v1/call`` frame, as the client builds it, in the client's session.

    It uploads 100s into the resident state, so a bad call that failed to roll
    back would show in ``assert_unchanged``. ``sections`` replaces sections.
    """
    packed = resident.step.placement.packed(resident.step)
    state = resident.state
    records = [StateRecord.of(state, np.full(4, 100, np.float32))]
    full = {
        "function": packed.section,
        "args": pack(((np.ones(4, np.float32),), {})),
        "states": pack(records, refs=False),
    }
    full.update(sections or {})
    return CallRequest(
        session=client._session,  # the client's own session: its states are visible
        digest=packed.digest,
        refs=(state.id,) if refs is None else tuple(refs),
        uploads=client._ledger.bases([state]),  # the version it is based on
        pull=True, **full,
    ).to_frame().to_bytes()


def with_header(frame: bytes, **changes) -> bytes:
    """``frame`` with ``changes`` written into its JSON header (``encode`` fills versions)."""
    (length,) = struct.unpack_from("<I", frame, 4)
    header = json.loads(frame[8 : 8 + length])
    header.update(changes)
    head = json.dumps(header).encode()
    return frame[:4] + struct.pack("<I", len(head)) + head + frame[8 + length :]


def test_a_valid_raw_call_frame_is_accepted(server, client, resident):
    """The control for the raw tests below: the same frame with nothing wrong works."""
    response = post(server, "/v1/call", call_frame(client, resident))
    assert response.status_code == 200, response.text
    resident.value = np.full(4, 101, np.float32)  # the upload (100) plus the argument (1)
    assert_still_serving(server, client, resident)


# -- malformed frames ----------------------------------------------------------------
def test_bad_magic(server, client, resident):
    body = b"XXXX" + call_frame(client, resident)[4:]
    error = assert_error(
        post(server, "/v1/call", body),
        400,
        "ProtocolError",
        "starts with b'XXXX', not b'SHF1'",
        "Fix: send frames built by statehost's client",
    )
    assert "POST /v1/call" in error["message"]
    assert_still_serving(server, client, resident)


def test_header_not_json(server, client, resident):
    head = b"{this is not json"
    body = b"SHF1" + struct.pack("<I", len(head)) + head + struct.pack("<I", 0)
    assert_error(
        post(server, "/v1/call", body),
        400,
        "ProtocolError",
        "the header is not valid JSON",
        "Fix:",
    )
    assert_still_serving(server, client, resident)


def test_buffer_length_overruns_the_body(server, client, resident):
    """A frame cut short inside its last buffer; Content-Length matches what is sent."""
    body = call_frame(client, resident)[:-10]
    assert_error(
        post(server, "/v1/call", body),
        400,
        "ProtocolError",
        "but only",
        "remain (truncated?)",
        "send the whole body",
    )
    assert_still_serving(server, client, resident)


# -- pickles that cannot be loaded ---------------------------------------------------
def test_garbage_pickle_rolls_back_the_staged_upload(server, client, resident):
    garbage = Section(b"\x80\x05this is not a pickle at all")
    body = call_frame(client, resident, sections={"args": garbage})
    assert_error(
        post(server, "/v1/call", body),
        400,
        "PayloadError",
        "the args section could not be unpickled",
        "Fix:",
    )
    assert_still_serving(server, client, resident)


def _reduce_pickle(module: bytes, name: bytes, command: str, *, invalid: bool) -> bytes:
    """``module.name(command)`` as a raw pickle; ``invalid`` puts a bad opcode before REDUCE."""
    arg = command.encode()
    opcodes = [
        b"c" + module + b"\n" + name + b"\n",  # GLOBAL module.name
        b"(",  # MARK
        b"X" + struct.pack("<I", len(arg)) + arg,  # BINUNICODE command
        b"t",  # TUPLE
        b"\xff" if invalid else b"",  # not an opcode: loading stops here
        b"R.",  # REDUCE (the call), STOP
    ]
    return b"".join(opcodes)


@pytest.mark.parametrize(
    ("module", "invalid", "expected"),
    [
        pytest.param(b"os", True, "invalid load key", id="invalid-opcode-before-reduce"),
        pytest.param(
            b"statehost_e2e_no_such_module",
            False,
            "statehost_e2e_no_such_module",
            id="global-that-does-not-exist",
        ),
    ],
)
def test_hostile_looking_pickle_is_refused_and_never_runs(
    server, client, resident, tmp_path, module, invalid, expected
):
    marker = tmp_path / "pickle-ran"
    payload = _reduce_pickle(module, b"system", f"touch {marker}", invalid=invalid)
    body = call_frame(client, resident, sections={"function": Section(payload)})
    # The header's digest must match, or the server refuses the frame before unpickling.
    body = with_header(body, digest=hashlib.sha256(payload).hexdigest())
    error = assert_error(post(server, "/v1/call", body), 400, "PayloadError", expected, "Fix")
    assert not marker.exists()
    if not invalid:
        assert error["missing_module"] == "statehost_e2e_no_such_module"
    assert_still_serving(server, client, resident)


@pytest.fixture
def client_only_module(tmp_path, monkeypatch):
    """A module that only this test process can import (the server's sys.path lacks it)."""
    name = "statehost_e2e_helper"
    (tmp_path / f"{name}.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module(name)  # imported, so cloudpickle ships it by reference
    sys.modules.pop(name, None)


def test_callable_needing_a_module_the_server_lacks(server, client, resident, client_only_module):
    helper = client_only_module
    state = resident.state

    def scaled(x):
        state.value = state.value + helper.triple(x)
        return state.value

    with pytest.raises(PayloadError, match=r"needs module 'statehost_e2e_helper'") as info:
        client.jit(scaled)(jnp.ones(4, jnp.float32))
    assert info.value.missing_module == "statehost_e2e_helper"
    assert info.value.status == 400
    assert "register_pickle_by_value" in str(info.value)
    assert "install 'statehost_e2e_helper'" in str(info.value)
    assert_still_serving(server, client, resident)


# -- states the server does not have -------------------------------------------------
def test_unknown_state_id_in_refs(server, client, resident):
    unknown = uuid.uuid4().hex
    body = call_frame(client, resident, refs=[resident.state.id, unknown])
    error = assert_error(
        post(server, "/v1/call", body),
        404,
        "StateNotFoundError",
        f"no state with id {unknown}",
        "Fix: push the values again",
    )
    assert error["missing"] == [unknown]
    assert_still_serving(server, client, resident)


def test_pull_of_a_state_the_server_never_saw(server, client, resident):
    fresh = statehost.ParamState(jnp.zeros(3, jnp.float32))
    with pytest.raises(StateNotFoundError, match=rf"no state with id {fresh.id}") as info:
        client.pull(fresh)
    assert info.value.status == 404
    assert info.value.missing == [fresh.id]
    np.testing.assert_array_equal(fresh.value, np.zeros(3))
    assert_still_serving(server, client, resident)


# -- auth ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("token", "expected"),
    [
        pytest.param("wrong", "the token is not accepted by this server", id="wrong-token"),
        pytest.param(None, "no token. Send 'Authorization: Bearer <token>'", id="no-token"),
    ],
)
def test_bad_token_on_a_raw_call(server, client, resident, tmp_path, token, expected):
    marker = tmp_path / "never"
    payload = _reduce_pickle(b"os", b"system", f"touch {marker}", invalid=False)
    body = call_frame(client, resident, sections={"function": Section(payload)})
    body = with_header(body, digest=hashlib.sha256(payload).hexdigest())
    assert_error(post(server, "/v1/call", body, token=token), 401, "AuthError", expected)
    assert not marker.exists()  # refused before the body was unpickled
    assert_still_serving(server, client, resident)


def test_connect_with_a_wrong_token(server, client, resident):
    with pytest.raises(AuthError, match=r"the token is not accepted by this server") as info:
        statehost.connect(server.url, token="wrong")
    assert info.value.status == 401
    assert "Fix: use the token the server printed at start" in str(info.value)
    assert_still_serving(server, client, resident)


def test_connect_without_a_token(server, client, resident, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))  # no token file to fall back on
    with pytest.raises(AuthError, match=r"no token\. Send 'Authorization: Bearer <token>'"):
        statehost.connect(server.url)
    assert_still_serving(server, client, resident)


# -- versions ------------------------------------------------------------------------
def _other(version: str, index: int) -> str:
    parts = version.split(".")
    parts[index] = str(int(parts[index]) + 1)
    return ".".join(parts[: index + 1] + ["0"] * (len(parts) - index - 1))


@pytest.mark.parametrize(("name", "index"), [("jax", 1), ("python", 1), ("cloudpickle", 0)])
def test_version_mismatch_names_both_versions(server, client, resident, name, index):
    mine = local_versions()
    versions = {**mine, name: _other(str(mine[name]), index)}
    body = with_header(call_frame(client, resident), versions=versions)
    error = assert_error(
        post(server, "/v1/call", body),
        400,
        "VersionMismatchError",
        f"{name}: server has {mine[name]}, client has {versions[name]}",
        "Fix: install matching versions",
    )
    assert error["client"][name] == versions[name]
    assert error["server"][name] == mine[name]
    assert_still_serving(server, client, resident)


# -- oversized bodies ------------------------------------------------------------------
def test_oversized_body_is_refused_before_it_is_read(small_server):
    """Only the headers are sent: the 413 must come back without waiting for the body."""
    url = urllib.parse.urlsplit(small_server.url)
    with statehost.connect(small_server.url, token=small_server.token) as small:
        resident = make_resident(small)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=20)
        try:
            conn.putrequest("POST", "/v1/call")
            conn.putheader("authorization", f"Bearer {small_server.token}")
            conn.putheader("content-type", CONTENT_TYPE)
            conn.putheader("content-length", str(64 * SMALL_LIMIT))
            conn.endheaders()  # and no body at all
            raw = conn.getresponse()
            response = httpx.Response(raw.status, headers=raw.getheaders(), content=raw.read())
        finally:
            conn.close()
        error = assert_error(
            response,
            413,
            "PayloadTooLargeError",
            f"limit of {SMALL_LIMIT} bytes",
            "start the server with a larger --max-body",
        )
        assert error["limit"] == SMALL_LIMIT
        assert_still_serving(small_server, small, resident)


def test_client_call_with_an_oversized_argument(small_server):
    with statehost.connect(small_server.url, token=small_server.token) as small:
        resident = make_resident(small)
        big = np.ones(SMALL_LIMIT // 2, np.float32)  # 2 MiB
        with pytest.raises(PayloadTooLargeError, match=rf"limit of {SMALL_LIMIT} bytes") as info:
            small.jit(lambda x: x.sum())(big)
        assert info.value.status == 413
        assert_still_serving(small_server, small, resident)


# -- errors while running the user's function -----------------------------------------
def test_pmap_over_more_lanes_than_the_server_has_devices(server, client, resident):
    state = resident.state

    def lanes(x):
        return x * state.value[0]

    with pytest.raises(RemoteExecutionError, match=r"maps 16 lanes, but .* only 8 device") as info:
        client.pmap(lanes)(jnp.ones((16, 4), jnp.float32))
    assert info.value.status == 422
    assert info.value.exception_type == "ValueError"
    assert "map over at most 8 lanes" in str(info.value)
    assert_still_serving(server, client, resident)


def test_user_exception_carries_the_users_traceback(server, client, resident):
    state = resident.state

    def write_then_raise_boom(x):
        state.value = state.value * 0 + x
        raise ValueError("boom")

    with pytest.raises(RemoteExecutionError, match=r"the function raised ValueError: boom") as info:
        client.jit(write_then_raise_boom)(jnp.ones(4, jnp.float32))
    error = info.value
    assert error.status == 422
    assert error.exception_type == "ValueError"
    assert "write_then_raise_boom" in error.remote_traceback
    assert 'raise ValueError("boom")' in error.remote_traceback
    assert "engine.py" not in error.remote_traceback, error.remote_traceback
    server_dir = importlib.util.find_spec("statehost.server").submodule_search_locations[0]
    for internal in (
        server_dir,
        os.path.dirname(statehost.__file__),
        os.path.dirname(jax.__file__),
    ):
        assert internal + os.sep not in error.remote_traceback, error.remote_traceback
    assert_still_serving(server, client, resident)


def test_shape_error_leaves_the_state_unchanged(server, client, resident):
    with pytest.raises(RemoteExecutionError, match=r"raised TypeError: .*\(4,\).*\(3,\)") as info:
        resident.step(jnp.ones(3, jnp.float32))
    assert info.value.status == 422
    assert info.value.exception_type == "TypeError"
    # The client did not write anything into the local state either.
    np.testing.assert_array_equal(resident.state.value, resident.value)
    assert_still_serving(server, client, resident)
