"""Asynchronous dispatch through the real client and app (the call stream, in process)."""

import _thread
import gc
import threading
import time
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
import statehost.client
from statehost.client import (
    CallCancelledError,
    CallNotRunError,
    RemoteArray,
    RemoteExecutionError,
)
from statehost.transform import pmap
from statehost.wire import (
    CallRequest,
    ControlRequest,
    ErrorReply,
    FreeRequest,
    decode,
    decode_all,
    pack,
)
from tests.core.models import PARAM, Affine
from tests.inprocess import TOKEN, URL, metric

LANES = 8


def _pmap_options():
    return dict(axis_name="i", in_axes=0, out_axes=0, state_in_axes={0: PARAM},
                state_out_axes={0: PARAM})


def _counter():
    count = statehost.State(jnp.zeros((), jnp.int32), name="count")

    def bump():
        count.value = count.value + 1
        return count.value

    return count, bump


def test_warm_calls_return_remote_arrays_at_once_and_match_local(async_client):
    remote_model, local_model = Affine(LANES), Affine(LANES)
    remote = async_client.pmap(remote_model, **_pmap_options())
    local = pmap(local_model, **_pmap_options())
    outs = []
    for k in range(5):
        delta = np.full((LANES, 4), k + 1.0, np.float32)
        outs.append((remote(delta), local(delta)))
    for out, expected in outs:
        assert isinstance(out, RemoteArray)
        assert (out.shape, out.dtype, out.ndim, out.size) == (
            expected.shape, expected.dtype, expected.ndim, expected.size)
        np.testing.assert_array_equal(np.asarray(out), expected)
    assert remote_model.weight.is_deferred
    np.testing.assert_array_equal(remote_model.weight.value, local_model.weight.value)
    assert not remote_model.weight.is_deferred


def test_remote_array_reads_like_a_jax_array(async_client):
    w = statehost.ParamState(jnp.arange(3.0))
    f = async_client.jit(lambda: w.value * 2)
    f()
    x = f()
    assert repr(x) == repr(jnp.arange(3.0) * 2)
    assert x.tolist() == [0.0, 2.0, 4.0] and float(x[2]) == 4.0 and int(x[1]) == 2
    assert (x + 1).tolist() == [1.0, 3.0, 5.0] and (1 + x).tolist() == [1.0, 3.0, 5.0]
    assert float(x.sum()) == 6.0 and bool(x[1] > 1)
    assert jnp.sin(jnp.asarray(x)).shape == (3,)
    assert x.block_until_ready() is x
    assert jax.tree_util.tree_leaves({"a": x}) == [x]


def test_a_thousand_pipelined_increments_run_in_order(async_client):
    count, bump = _counter()
    step = async_client.jit(bump)
    outs = [step() for _ in range(1000)]
    async_client.sync()
    assert int(count.value) == 1000
    assert [int(o) for o in outs[::111]] == list(range(1, 1001, 111))


def test_the_first_call_of_a_signature_raises_at_the_call_site(async_client):
    w = statehost.ParamState(jnp.ones(3))
    f = async_client.jit(lambda x: w.value @ x)
    with pytest.raises(RemoteExecutionError, match="TypeError"):
        f(np.ones(4, np.float32))  # a shape error: a new signature is synchronous
    assert float(f(np.ones(3, np.float32))) == 3.0


def test_a_failure_raises_at_the_next_sync_point_and_the_calls_behind_it_do_not_run(
        async_client):
    count, bump = _counter()

    def checked(limit):
        value = bump()
        jax.debug.callback(_fail_above, value, limit)
        return value

    step = async_client.jit(checked)
    step(np.int32(100))  # the first call of the signature (synchronous)
    outs = [step(np.int32(3)) for _ in range(6)]  # the 3rd fails: count would be 4 > 3
    with pytest.raises(RemoteExecutionError, match="count 4 is above 3") as info:
        async_client.sync()
    assert "_fail_above" in info.value.remote_traceback
    assert [int(o) for o in outs[:2]] == [2, 3]
    with pytest.raises(RemoteExecutionError, match="count 4 is above 3"):
        outs[2].block_until_ready()
    for later in outs[3:]:
        with pytest.raises(CallNotRunError, match="was not run"):
            np.asarray(later)
    assert int(count.value) == 3  # the failed call and those behind it changed nothing
    assert int(step(np.int32(100))) == 4  # the stream runs calls again


def _fail_above(value, limit):
    if value > limit:
        raise ValueError(f"count {value} is above {limit}")


def test_reading_a_state_a_failed_call_would_have_written_raises_its_error(async_client):
    count, bump = _counter()

    def checked(limit):
        value = bump()
        jax.debug.callback(_fail_above, value, limit)
        return value

    step = async_client.jit(checked)
    step(np.int32(100))
    step(np.int32(0))
    with pytest.raises(RemoteExecutionError, match="count 2 is above 0"):
        _ = count.value
    assert int(count.value) == 1  # read again: the server's value, unchanged


def test_chained_remote_arrays_stay_on_the_server(async_client):
    big = np.ones((LANES, 32768), np.float32)  # 1 MiB
    w = statehost.ParamState(jnp.zeros(()))
    scale = async_client.jit(lambda x: x * 2 + w.value)
    x = scale(big)  # uploads 1 MiB once
    x = scale(x)
    before = metric(async_client, "statehost_wire_bytes_total", direction="in", part="stream")
    for _ in range(5):
        x = scale(x)
    async_client.sync()
    moved = metric(async_client, "statehost_wire_bytes_total", direction="in",
                   part="stream") - before
    assert moved < 5 * 4096, moved  # handles, not 1 MiB arrays
    np.testing.assert_array_equal(np.asarray(x), np.full_like(big, 2.0**7))


def test_a_warm_call_with_arguments_over_a_mib_goes_by_http_not_the_stream(async_client):
    # A WebSocket message is copied whole on both sides; HTTP streams the frame in chunks.
    big = np.ones((LANES, 65536), np.float32)  # 2 MiB
    total = async_client.jit(lambda x: x.sum())
    np.testing.assert_allclose(np.asarray(total(big)), big.size)  # the first call: HTTP
    stream_before = metric(async_client, "statehost_wire_bytes_total", direction="in",
                           part="stream")
    http_before = metric(async_client, "statehost_wire_bytes_total", direction="in",
                         part="args")
    out = total(big * 2)
    np.testing.assert_allclose(np.asarray(out), 2 * big.size)
    assert metric(async_client, "statehost_wire_bytes_total", direction="in",
                  part="stream") - stream_before < 4096
    assert metric(async_client, "statehost_wire_bytes_total", direction="in",
                  part="args") - http_before >= big.nbytes


def test_states_written_asynchronously_move_no_bytes_until_read(async_client):
    weight = statehost.ParamState(jnp.zeros((LANES, 32768)))  # 1 MiB, stays remote

    def grow():
        weight.value = weight.value + 1
        return weight.value[0, 0]

    step = async_client.jit(grow)
    step()
    out_before = metric(async_client, "statehost_wire_bytes_total", direction="out",
                        part="stream")
    for _ in range(5):
        step()
    async_client.sync()
    out_after = metric(async_client, "statehost_wire_bytes_total", direction="out",
                       part="stream")
    assert out_after - out_before < 5 * 4096
    assert weight.is_deferred and "ShapedArray(float32[8,32768])" in repr(weight)
    assert float(weight.value[0, 0]) == 6.0
    fetched = metric(async_client, "statehost_wire_bytes_total", direction="out",
                     part="stream") - out_after
    assert fetched >= LANES * 32768 * 4


# Module-level, so the calls pickle them by reference and the in-process server waits on
# this very Event.
GATE = threading.Event()


def _hold():
    GATE.wait(30)


def _held(bump):
    def held():
        jax.debug.callback(_hold)
        return bump()
    return held


def test_max_in_flight_blocks_the_next_call(transport):
    gate = GATE
    count, bump = _counter()
    held = _held(bump)

    with statehost.connect(URL, token=TOKEN, transport=transport, max_in_flight=2) as client:
        step = client.jit(held)
        gate.set()
        step()  # synchronous: learns the signature
        gate.clear()
        issued = []
        worker = threading.Thread(target=lambda: issued.extend(step() for _ in range(3)))
        worker.start()
        deadline = time.monotonic() + 10
        while client._dispatcher.in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert client._dispatcher.stream.in_flight == 2 and worker.is_alive()
        gate.set()
        worker.join(10)
        assert not worker.is_alive() and len(issued) == 3
        client.sync()
        assert int(count.value) == 4


def test_ctrl_c_while_waiting_cancels_the_calls_not_started(transport):
    gate = GATE
    count, bump = _counter()
    held = _held(bump)

    with statehost.connect(URL, token=TOKEN, transport=transport) as client:
        step = client.jit(held)
        gate.set()
        step()
        gate.clear()
        outs = [step() for _ in range(5)]
        threading.Timer(0.3, _thread.interrupt_main).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            client.sync()
        assert time.monotonic() - start < 1.5
        gate.set()
        assert int(outs[0]) == 2  # it was running: it finished and committed
        for out in outs[1:]:
            with pytest.raises(CallCancelledError, match="cancelled before it started"):
                np.asarray(out)
        assert int(count.value) == 2
        assert int(step()) == 3


@pytest.mark.parametrize("mode", ["connect", "mapping"])
def test_sync_dispatch_returns_jax_arrays(transport, mode):
    options = {"dispatch": "sync"} if mode == "connect" else {}
    with statehost.connect(URL, token=TOKEN, transport=transport, **options) as client:
        w = statehost.ParamState(jnp.ones(2))
        f = client.jit(lambda: w.value * 3, sync=(mode == "mapping"))
        assert all(isinstance(f(), jax.Array) for _ in range(3))


def test_connect_refuses_bad_dispatch_options(transport):
    with pytest.raises(ValueError, match="dispatch='later' is not one of"):
        statehost.connect(URL, token=TOKEN, transport=transport, dispatch="later")
    with pytest.raises(ValueError, match="max_in_flight=0 must be an int >= 1"):
        statehost.connect(URL, token=TOKEN, transport=transport, max_in_flight=0)


def test_a_dropped_connection_is_reopened_and_nothing_is_applied_twice(async_client):
    count, bump = _counter()
    step = async_client.jit(bump)
    step()
    outs = [step() for _ in range(40)]
    async_client._dispatcher.stream._conn.close()  # as if the network dropped the socket
    outs += [step() for _ in range(10)]
    async_client.sync()
    assert int(count.value) == 51
    assert sorted(int(o) for o in outs) == list(range(2, 52))


def test_dropped_remote_arrays_are_freed_on_the_server(async_client):
    w = statehost.ParamState(jnp.zeros(()))
    f = async_client.jit(lambda: w.value + 1)
    f()
    for _ in range(200):
        f()  # each output dropped at once
    async_client.sync()  # sends the last frees, which run before the next call
    assert float(f()) == 1.0
    session = next(iter(async_client_sessions(async_client)))
    assert len(session.handles) <= 2


def async_client_sessions(client):
    rt = client._http._transport.app.state.runtime
    return [rt.sessions._sessions[client._session]]


# -- the channel itself, with raw frames ------------------------------------------------
def _raw(transport):
    return transport.open_stream("/v1/stream", {"authorization": f"Bearer {TOKEN}"})


def test_a_frame_that_cannot_be_read_closes_the_channel_and_the_server_serves_on(
        async_client, transport):
    conn = _raw(transport)
    conn.send(b"not a frame at all")
    assert conn.recv() is None and conn.close_code == 1007
    assert "SHF1" in conn.close_reason or "frame" in conn.close_reason
    w = statehost.ParamState(jnp.ones(2))
    assert float(async_client.jit(lambda: w.value.sum())()) == 2.0


def test_a_message_with_bad_fields_gets_an_error_and_the_channel_goes_on(async_client,
                                                                          transport):
    conn = _raw(transport)
    bad = CallRequest(session=async_client._session, call_id="c1", digest="0" * 64,
                      args=pack(((), {})))
    frame = bad.to_frame().to_bytes().replace(b'"digest"', b'"d1gest"')
    conn.send(frame)
    reply = ErrorReply.from_frame(decode(conn.recv()))
    assert reply.call_id == "c1" and reply.status == 400 and "digest" in reply.error["message"]
    conn.send(FreeRequest(session=async_client._session, handles=("x:0",)).to_frame().to_bytes())
    conn.send(ControlRequest(session=async_client._session, op="explode").to_frame().to_bytes())
    reply = ErrorReply.from_frame(decode(conn.recv()))
    assert "control op 'explode'" in reply.error["message"]
    conn.close()


def test_the_stream_refuses_a_missing_token(transport):
    conn = transport.open_stream("/v1/stream", {})
    reply = ErrorReply.from_frame(decode(conn.recv()))
    assert reply.error["type"] == "AuthError"
    assert conn.recv() is None and conn.close_code == 1008


def test_a_resent_call_id_is_answered_with_its_first_outcome(async_client, transport):
    count, bump = _counter()
    step = async_client.jit(bump)
    step()  # the server now has the function cached, the state resident
    async_client.sync()
    packed = step.placement.packed(step)
    twin = async_client._stream_twin()
    message = CallRequest(session=async_client._session, call_id="again", digest=packed.digest,
                          refs=(count.id, twin.state.id), default_stream=twin.state.id,
                          keep_outputs=True, args=pack(((), {})))
    conn = _raw(transport)
    conn.send(message.to_frame().to_bytes())
    first = conn.recv()
    conn.send(message.to_frame().to_bytes())
    assert conn.recv() == first
    conn.close()
    async_client.pull(count)
    assert int(count.value) == 2  # applied once


def test_a_call_past_its_timeout_before_it_starts_is_dropped(transport):
    count, bump = _counter()
    held = _held(bump)
    with statehost.connect(URL, token=TOKEN, transport=transport) as client:
        slow = client.jit(held)
        GATE.set()
        slow()
        GATE.clear()
        quick = client.jit(bump, timeout=0.2)
        quick()  # learns its signature (runs at once: nothing holds the state)
        slow()  # holds the count for as long as the gate is shut
        late = quick()  # must wait for the slow call's lock: past 0.2 s it is dropped
        time.sleep(0.6)
        GATE.set()
        with pytest.raises(statehost.client.CallTimeoutError, match="never started"):
            np.asarray(late)
        assert int(count.value) == 3  # slow, quick, slow: the late call applied nothing


def test_a_bad_timeout_is_refused_when_the_transform_is_built(async_client):
    with pytest.raises(ValueError, match="timeout=-1 must be a number of seconds > 0"):
        async_client.jit(lambda: 1, timeout=-1)


def _received(transport, conn) -> None:
    """Returns once the app has taken every message ``conn`` sent off its socket (the
    in-process socket's inbox is empty and the route has run for the last one)."""
    import asyncio

    async def drained() -> None:
        while not conn._in.empty():
            await asyncio.sleep(0)
        await asyncio.sleep(0)

    transport._portal.call(drained)


def test_replies_ready_together_share_a_message_and_all_arrive(transport):
    count, bump = _counter()
    held = _held(bump)
    with statehost.connect(URL, token=TOKEN, transport=transport) as client:
        step = client.jit(held)
        GATE.set()
        step()  # blocking: the signature is known from here on
        step()
        client.sync()
        conn = client._dispatcher._stream._conn
        frames_per_message: list[int] = []
        recv = conn.recv

        def counting(timeout=None):
            data = recv(timeout)
            if data is not None:
                frames_per_message.append(len(decode_all(data)))
            return data

        conn.recv = counting  # the reader's next recv and on
        GATE.clear()
        outs = [step() for _ in range(40)]  # the first holds the worker; 39 queue behind
        _received(transport, client._dispatcher._stream._conn)
        GATE.set()
        client.sync()
        assert [int(o) for o in outs] == list(range(3, 43))  # every reply, in order
        assert int(count.value) == 42
    # The 39 calls queued behind the held one ran back to back on one worker; their
    # replies left in fewer messages than there were replies.
    assert sum(frames_per_message) >= 39 and max(frames_per_message) > 1, frames_per_message


def test_requests_sent_while_many_are_unanswered_leave_together_in_order(transport):
    count, bump = _counter()
    held = _held(bump)
    with statehost.connect(URL, token=TOKEN, transport=transport) as client:
        step = client.jit(held)
        GATE.set()
        step()
        step()
        client.sync()
        conn = client._dispatcher._stream._conn
        frames_per_message: list[int] = []
        send = conn.send

        def counting(data):
            frames_per_message.append(len(decode_all(data)))
            send(data)

        conn.send = counting
        GATE.clear()
        outs = [step() for _ in range(30)]  # the first holds the server: no reply comes
        GATE.set()
        client.sync()
        assert [int(o) for o in outs] == list(range(3, 33))
    # Past 8 unanswered, requests waited for a reply (or 15 others) to leave with.
    assert sum(frames_per_message[:-1]) >= 30 and max(frames_per_message) > 1, \
        frames_per_message


def test_the_stream_takes_several_frames_in_one_message(async_client, transport):
    conn = _raw(transport)
    session = async_client._session
    free = FreeRequest(session=session, handles=("x:0",)).to_frame().to_bytes()
    explode = ControlRequest(session=session, op="explode").to_frame().to_bytes()
    conn.send(free)  # a frame alone first: the channel accepts these versions
    conn.send(explode + free + explode)
    replies: list = []
    while len(replies) < 2:
        replies += decode_all(conn.recv())
    assert [ErrorReply.from_frame(f).error["message"].count("control op 'explode'")
            for f in replies] == [1, 1]
    conn.close()


def test_several_frames_before_any_alone_close_the_channel(async_client, transport):
    conn = _raw(transport)
    free = FreeRequest(session=async_client._session, handles=("x:0",)).to_frame().to_bytes()
    conn.send(free + free)
    assert conn.recv() is None and conn.close_code == 1007
    assert "send a frame alone first" in conn.close_reason


def test_states_written_by_calls_are_read_after_the_client_closes(transport):
    """``with connect(...) as client: ...`` then ``weight.value``: the values the calls
    wrote come back at close (in one pull), not a hang on a closed stream."""
    first = statehost.ParamState(jnp.zeros((LANES, 4)))
    second = statehost.ParamState(jnp.ones(3))

    def grow():
        first.value = first.value + 1
        second.value = second.value * 2
        return first.value[0, 0]

    with statehost.connect(URL, token=TOKEN, transport=transport) as client:
        step = client.jit(grow)
        step()  # blocking (a new signature)
        step()  # asynchronous
        assert first.is_deferred and second.is_deferred
    assert not first.is_deferred and not second.is_deferred
    np.testing.assert_array_equal(first.value, np.full((LANES, 4), 2.0))
    np.testing.assert_array_equal(second.value, np.full(3, 4.0))


def _fetches(client):
    calls = client._http.json("GET", "/v1/calls", params={"last": 1000})
    return sum(1 for c in calls if c["kind"] == "fetch")


def test_a_loop_that_reads_each_output_gets_it_with_the_reply(transport):
    """Reading every step's output (``print(loss)`` in a loop) costs one round trip a step,
    not two: once the client saw an output read before the next call of its signature, the
    next call's reply brings its small outputs, and reading them fetches nothing."""
    count, bump = _counter()
    with statehost.connect(URL, token=TOKEN, transport=transport) as client:
        step = client.jit(bump)
        assert int(step()) == 1  # blocking (a new signature)
        assert int(step()) == 2  # asynchronous, read: the next reply brings its output
        read_each = step()
        unread = [step(), step()]  # issued with no read between: fetched when read
        unread[-1].block_until_ready()
        before = _fetches(client)
        assert int(read_each) == 3  # came with its reply
        assert _fetches(client) == before
        assert int(unread[0]) == 4 and _fetches(client) == before + 1
        assert int(unread[1]) == 5
        read_each_again = step()  # read above: its reply brings it, so close fetches none
        read_each_again.block_until_ready()
        session = client._session
    assert int(read_each_again) == 6
    np.testing.assert_array_equal(count.value, 6)
    with statehost.connect(URL, token=TOKEN, transport=transport) as other:
        calls = other._http.json("GET", "/v1/calls", params={"last": 1000})
    # after `before`: unread[0]'s and unread[1]'s, and none at close
    assert sum(c["kind"] == "fetch" and c["session"] == session[:8] for c in calls) \
        == before + 2


def test_outputs_still_held_at_close_are_fetched_and_read_after_it(transport):
    """``with connect(...) as client: out = step()`` then ``print(out)``: as the states the
    calls wrote, the outputs still held and not read come back at close (in one fetch),
    not a ClientClosedError; those dropped before close are not fetched."""
    count, bump = _counter()
    with statehost.connect(URL, token=TOKEN, transport=transport) as client:
        step = client.jit(bump)
        first = step()  # blocking (a new signature): its value came with the reply
        kept = [step() for _ in range(3)]  # asynchronous, never read while open
        for _ in range(5):
            step()  # dropped at once: freed, never fetched
        last = step()
        last.block_until_ready()
        assert _fetches(client) == 0
        session = client._session
    assert [int(x) for x in (first, *kept, last)] == [1, 2, 3, 4, 10]
    np.testing.assert_array_equal(count.value, 10)
    with statehost.connect(URL, token=TOKEN, transport=transport) as other:
        calls = other._http.json("GET", "/v1/calls", params={"last": 1000})
    fetched = [c for c in calls if c["kind"] == "fetch" and c["session"] == session[:8]]
    assert len(fetched) == 1, fetched


def test_outputs_read_each_step_match_the_local_loop(async_client):
    remote_model, local_model = Affine(LANES), Affine(LANES)
    remote = async_client.pmap(remote_model, **_pmap_options())
    local = pmap(local_model, **_pmap_options())
    for k in range(6):
        delta = np.full((LANES, 4), k + 1.0, np.float32)
        out, expected = remote(delta), local(delta)
        assert isinstance(out, RemoteArray)
        assert (out.dtype, out.weak_type) == (expected.dtype, expected.weak_type)
        np.testing.assert_array_equal(np.asarray(out), expected)
    np.testing.assert_array_equal(remote_model.weight.value, local_model.weight.value)


def _pulls(client):
    calls = client._http.json("GET", "/v1/calls", params={"last": 1000})
    return sum(1 for c in calls if c["kind"] == "pull")


def test_reading_one_state_a_call_wrote_pulls_every_state_it_wrote_at_once(async_client):
    """A model's states, read after an asynchronous step, come back in one pull, not one
    round trip per state."""
    a = statehost.ParamState(jnp.zeros(3))
    b = statehost.ParamState(jnp.ones(2))
    c = statehost.ParamState(jnp.zeros((2, 2), jnp.int32))

    def step():
        a.value = a.value + 1
        b.value = b.value * 2
        c.value = c.value - 1
        return a.value[0]

    f = async_client.jit(step)
    f()  # blocking (a new signature)
    f()  # asynchronous: the three are deferred
    assert a.is_deferred and b.is_deferred and c.is_deferred
    before = _pulls(async_client)
    np.testing.assert_array_equal(a.value, np.full(3, 2.0))
    np.testing.assert_array_equal(b.value, np.full(2, 4.0))
    np.testing.assert_array_equal(c.value, np.full((2, 2), -2))
    assert _pulls(async_client) == before + 1
    f()  # and a later call defers them again: its values, not the pulled ones
    np.testing.assert_array_equal(b.value, np.full(2, 8.0))
    np.testing.assert_array_equal(a.value, np.full(3, 3.0))
    assert _pulls(async_client) == before + 2


def test_a_client_dropped_without_close_is_collected_and_closes_its_stream(transport):
    """The finalizer that closes a dropped client's stream must not keep the client alive
    (it did: the stream's reconnect function held the client, and the finalizer the
    stream)."""
    count, bump = _counter()
    client = statehost.connect(URL, token=TOKEN, transport=transport)
    step = client.jit(bump)
    step()
    assert int(step()) == 2  # asynchronous: the stream is open
    int(count.value)  # a deferred value keeps the client (its fetcher) alive, by design
    stream = client._dispatcher.stream
    gone = weakref.ref(client)
    del client, step
    gc.collect()
    assert gone() is None
    assert stream.broken  # closed with it
