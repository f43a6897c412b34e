"""Admission by device memory (``statehost.server.admission``), on CPU through
``--device-memory``: a call whose compiled program fits runs; one that does not fit now
waits in the queue (no thread) and runs once another session frees its states; one that
waits past its deadline, or needs more than a device has, gets a 507 DeviceMemoryError
that says why; XLA's own RESOURCE_EXHAUSTED is a DeviceMemoryError too. After every
refusal the states are unchanged and the server goes on serving.

Sizes: one float32 vector of 2**18 elements is 1 MiB. ``grow`` reads and writes ``w``
(1 MiB in, 1 MiB out) and returns a 2 MiB array: its program needs about 4 MiB.
"""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client import DeviceMemoryError
from statehost.server.admission import Admission, Demand, device_bytes, size
from tests.server.scheduling import until, until_async

MiB = 2**20
N = 2**18  # float32 elements in 1 MiB


def _grow(w):
    def grow():
        w.value = w.value + 1
        return jnp.ones(2 * N, jnp.float32) * w.value[0]
    return grow


def _first(out) -> float:
    """The first element of a call's output (reading it raises the call's error)."""
    return float(np.asarray(out).reshape(-1)[0])


def _waiting_for_memory(s) -> bool:
    return any(c.short_of_memory is not None for c in s.scheduler.calls)


@pytest.fixture
def box(server):
    """An 8 MiB device 0: tenant A keeps 6 MiB resident, B has its 1 MiB state ``w``."""
    s = server(device_memory=8 * MiB, workers=2, session_workers=2)
    a, b = s.connect(), s.connect()
    big = statehost.ParamState(jnp.zeros(6 * N, jnp.float32))
    a.push(big)
    w = statehost.ParamState(jnp.zeros(N, jnp.float32))
    b.push(w)
    yield s, a, b, w
    a.close()
    b.close()


def test_a_call_that_fits_runs_and_its_estimate_costs_no_second_compile(server):
    s = server(device_memory=64 * MiB)
    listened: list[str] = []

    def listen(name: str, seconds: float, **kwargs) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            listened.append(name)

    with s.connect() as client:
        w = statehost.ParamState(jnp.zeros(N, jnp.float32))
        grow = client.jit(_grow(w))
        jax.monitoring.register_event_duration_secs_listener(listen)
        try:
            assert _first(grow()) == 1.0
        finally:
            jax.monitoring.unregister_event_duration_listener(listen)
        assert _first(grow()) == 2.0
        assert float(np.asarray(w.value)[0]) == 2.0
    # the first call compiled its program once (for the estimate, and JAX reused it to
    # run); the second used the cached estimate and the cached program
    assert len(listened) == 1
    assert s.metric("statehost_compiles_total") == 1
    info = s.http.get("/v1/info").json()["admission"]
    assert info == {"enabled": True, "device_memory": 64 * MiB, "reserved": {}}


def test_a_call_that_does_not_fit_waits_until_another_session_frees_its_states(box):
    s, a, b, w = box
    grow = b.jit(_grow(w))
    answer: list = []
    thread = threading.Thread(target=lambda: answer.append(_first(grow())))
    thread.start()
    until(lambda: _waiting_for_memory(s))  # sent back to the queue: it holds no worker
    assert (s.scheduler.running, s.scheduler.queued) == (0, 1)
    assert not answer
    a.close()  # frees A's 6 MiB: the call fits now
    thread.join(60)
    assert answer == [1.0]
    assert s.metric("statehost_compiles_total") == 1  # compiled when first sent back
    b.pull(w)
    assert float(np.asarray(w.value)[0]) == 1.0


def test_a_call_that_uploads_its_state_waits_and_then_runs_with_it(box):
    """The upload travels with the call: staged, rolled back when the call is sent back to
    the queue, staged again when it starts."""
    s, a, b, _ = box
    fresh = statehost.ParamState(jnp.full(N, 5.0, jnp.float32))
    grow = b.jit(_grow(fresh))
    answer: list = []
    thread = threading.Thread(target=lambda: answer.append(_first(grow())))
    thread.start()
    until(lambda: _waiting_for_memory(s))
    a.close()
    thread.join(60)
    assert answer == [6.0]
    b.pull(fresh)
    assert float(np.asarray(fresh.value)[0]) == 6.0
    assert _first(grow()) == 7.0  # resident now, and committed once


def test_a_call_that_waits_for_memory_past_its_deadline_gets_507(box):
    s, a, b, w = box
    grow = b.jit(_grow(w), timeout=0.3)
    with pytest.raises(DeviceMemoryError, match=(
            r"not started within its 0.3 s deadline: its program needs an estimated "
            r"4\.0 MiB on device 0 \(temp .* \+ arguments .* \+ outputs .* - aliased .*\), "
            r"and 1\.0 MiB of the device's 8\.0 MiB were free \(--device-memory less the "
            r"resident states")) as caught:
        _first(grow())
    message = str(caught.value)
    assert caught.value.status == 507
    assert "was never started, so nothing was applied" in message
    assert "Largest states resident on device 0: anonymous state" in message
    assert "(6.0 MiB), anonymous state" in message  # A's state first, then B's w
    # the program's few scalars (the random key, ...) come on top of the 4 MiB
    assert 4 * MiB <= caught.value.estimate_bytes < 4 * MiB + 1024
    assert caught.value.free_bytes == MiB
    assert s.metric("statehost_call_timeouts_total") == 1
    # nothing changed, and the server serves: w is as it was, and a small call runs
    b.pull(w)
    np.testing.assert_array_equal(np.asarray(w.value), np.zeros(N, np.float32))
    assert float(b.jit(lambda x: x * 2)(np.float32(3))) == 6.0


def test_a_call_larger_than_the_device_fails_at_once(server):
    s = server(device_memory=2 * MiB)
    with s.connect() as client:
        w = statehost.ParamState(jnp.zeros(N, jnp.float32))
        client.push(w)
        with pytest.raises(DeviceMemoryError, match=(
                r"its program needs an estimated 4\.0 MiB on device 0 .*, more than the "
                r"device's 2\.0 MiB \(--device-memory less the resident states\): it can never "
                r"run there, and was not started")) as caught:
            _first(client.jit(_grow(w))())
        assert caught.value.status == 507
        assert s.scheduler.queued == 0  # refused, not waiting
        client.pull(w)
        np.testing.assert_array_equal(np.asarray(w.value), np.zeros(N, np.float32))


def _huge(w):
    def huge():  # 2 EiB: more than any address space, so no machine can allocate it
        w.value = w.value + 1
        return jnp.broadcast_to(w.value[0], (2**29, 2**30)) + 1
    return huge


def test_xla_running_out_of_memory_is_a_device_memory_error(server):
    """Without admission (a CPU server with no --device-memory) the program runs, and XLA's
    allocation fails: a real RESOURCE_EXHAUSTED, answered as a DeviceMemoryError."""
    s = server()
    assert s.http.get("/v1/info").json()["admission"]["enabled"] is False
    with s.connect() as client:
        w = statehost.ParamState(jnp.zeros(4, jnp.float32))
        client.push(w)
        with pytest.raises(DeviceMemoryError, match=(
                r"XLA ran out of device memory while the call ran \(RESOURCE_EXHAUSTED: Out "
                r"of memory allocating \d+ bytes\.\)\. The call was not applied: every state "
                r"keeps its previous value")) as caught:
            _first(client.jit(_huge(w))())
        assert caught.value.status == 507 and caught.value.estimate_bytes is None
        client.pull(w)
        np.testing.assert_array_equal(np.asarray(w.value), np.zeros(4, np.float32))
        assert float(client.jit(lambda x: x * 2)(np.float32(3))) == 6.0


def test_with_admission_the_same_program_is_refused_before_it_runs(server):
    s = server(device_memory=64 * MiB)
    with s.connect() as client:
        w = statehost.ParamState(jnp.zeros(4, jnp.float32))
        with pytest.raises(DeviceMemoryError, match=r"needs an estimated 2048\.0 PiB|needs an "
                           r"estimated [\d.]+ TiB on device 0 .* it can never run there"):
            _first(client.jit(_huge(w))())


# -- the pieces ------------------------------------------------------------------------------
def test_device_bytes_counts_each_devices_share():
    devices = jax.devices()
    one = jax.device_put(np.zeros(N, np.float32), devices[1])
    assert device_bytes(one) == {1: MiB}
    sharded = jax.pmap(lambda x: x)(np.zeros((8, N), np.float32))  # a slice per device
    assert device_bytes({"a": sharded}) == {d.id: MiB for d in devices}
    assert device_bytes(np.zeros(4)) == {}  # a host array holds no device memory


def test_admission_credits_the_calls_own_states_and_counts_reservations():
    own = jax.device_put(np.zeros(N, np.float32), jax.devices()[0])
    other = jax.device_put(np.zeros(4 * N, np.float32), jax.devices()[0])
    resident = [("own", "own state", own), ("other", "team/net", other)]
    admission = Admission(8 * MiB, lambda: resident)
    demand = Demand(4 * MiB, (0,), arguments=MiB, outputs=3 * MiB)
    # 8 - 5 resident = 3 free; the call needs 4 less its own 1 MiB already there
    assert admission.check(demand, ["own"]).fits
    verdict = admission.check(demand)
    assert (verdict.fits, verdict.never, verdict.need, verdict.free) == (False, False, 4 * MiB,
                                                                         3 * MiB)
    call = object()
    admission.reserve(call, Demand(2 * MiB, (0,)))  # a running call holds 2 MiB
    assert not admission.check(demand, ["own"]).fits and admission.reserved() == {0: 2 * MiB}
    admission.release(call)
    assert admission.reserved() == {} and admission.check(demand, ["own"]).fits
    assert admission.check(Demand(9 * MiB, (0,))).never
    assert admission.largest(0) == "team/net (4.0 MiB), own state (1.0 MiB)"
    assert Admission(None, lambda: resident).check(Demand(10**15, (0,))).fits  # no limit


def test_sizes_read_as_units():
    assert [size(n) for n in (512, 1536, 4 * MiB, 3 * 2**40)] == [
        "512 B", "1.5 KiB", "4.0 MiB", "3.0 TiB"]


def test_device_memory_must_be_a_positive_size():
    from statehost.server import Settings

    assert Settings.from_env({"STATEHOST_DEVICE_MEMORY": "64MiB"}).device_memory == 64 * MiB
    with pytest.raises(ValueError, match="device_memory=0 must be a positive size"):
        Settings(device_memory=0)


def test_a_cancelled_call_waiting_for_memory_never_starts(box):
    s, a, b, w = box
    grow = b.jit(_grow(w))
    caught: list = []

    def send():
        try:
            _first(grow())
        except Exception as exc:  # the test looks at it below
            caught.append(exc)

    thread = threading.Thread(target=send)
    thread.start()
    until(lambda: _waiting_for_memory(s))
    (call,) = list(s.scheduler.calls)
    answer = s.http.post(f"/v1/calls/{call.id}/cancel").json()
    assert answer == {"id": call.id, "status": "cancelled", "cancel_requested": True}
    thread.join(60)
    (error,) = caught
    assert type(error).__name__ == "CallCancelledError" and error.status == 409
    b.pull(w)
    np.testing.assert_array_equal(np.asarray(w.value), np.zeros(N, np.float32))


# -- the scheduler's side: waiting for memory keeps a call's place ---------------------------
def test_a_call_waiting_for_memory_keeps_its_place_on_its_states(sessions, schedulers):
    """X does not fit; Y on other states runs meanwhile; Z, on X's state and sent after X,
    fits but waits behind X; when memory frees, X runs, then Z. Each work asks for its
    memory before it runs, as ``execution._admit`` does."""
    import asyncio

    from statehost.server.calls import Call

    create, _ = sessions
    resident = [("other", "team/big", jax.device_put(np.zeros(4 * N, np.float32),
                                                     jax.devices()[0]))]
    admission = Admission(8 * MiB, lambda: list(resident))
    order: list[str] = []

    def work(name: str, mib: int):
        def run(call: Call) -> str:
            scheduler.admit(call, Demand(mib * MiB, (0,)))
            order.append(name)
            return name
        return run

    scheduler = schedulers(2, session_workers=2, admission=admission)

    async def main():
        s = create()
        x = asyncio.ensure_future(scheduler.submit(Call("call", s, ("k",), work("x", 6))))
        await until_async(lambda: any(c.short_of_memory for c in scheduler.calls))
        assert await scheduler.submit(Call("call", s, ("j",), work("y", 1))) == "y"
        z = asyncio.ensure_future(scheduler.submit(Call("call", s, ("k",), work("z", 1))))
        await asyncio.sleep(0)
        assert scheduler.queued == 2 and order == ["y"]  # z fits, but x is first on "k"
        resident.clear()  # team/big deleted: the next look (RECHECK_S) finds room
        assert await asyncio.gather(x, z) == ["x", "z"]
        assert admission.reserved() == {}

    asyncio.run(main())
    assert order == ["y", "x", "z"]


def test_a_call_waiting_for_memory_fails_with_507_at_its_deadline(sessions, schedulers):
    import asyncio

    from statehost.server.calls import Call
    from statehost.server.errors import DeviceMemoryError as ServerDeviceMemoryError

    create, _ = sessions
    admission = Admission(8 * MiB, lambda: [])
    scheduler = schedulers(1, admission=admission)
    ran: list[str] = []

    def work(call: Call) -> None:
        scheduler.admit(call, Demand(5 * MiB, (0,)))
        ran.append(call.id)

    async def main():
        holder = Call("call", create(), (), lambda c: None)
        admission.reserve(holder, Demand(4 * MiB, (0,)))  # as if a running call held 4 MiB
        with pytest.raises(ServerDeviceMemoryError, match=r"not started within its 0.2 s "
                           r"deadline: its program needs an estimated 5\.0 MiB on device 0 "
                           r".*and 4\.0 MiB of the device's 8\.0 MiB were free "
                           r"\(--device-memory less the resident states; 4\.0 MiB held by "
                           r"running calls\)") as caught:
            await scheduler.submit(Call("call", create(), ("k",), work, timeout=0.2))
        assert caught.value.status == 507 and not ran
        assert scheduler.queued == 0 and scheduler.lock_count() == 0

    asyncio.run(main())


class _ReportingDevice:
    """A device that reports its memory, as a GPU's ``memory_stats()`` does (CPU devices
    report none, so the platform's path is driven with this stand-in)."""

    id, platform = 0, "gpu"

    def __init__(self, limit: int, in_use: int):
        self.limit, self.in_use = limit, in_use

    def memory_stats(self) -> dict[str, int]:
        return {"bytes_limit": self.limit, "bytes_in_use": self.in_use}


def test_a_device_that_reports_its_memory_is_checked_against_its_own_figures():
    device = _ReportingDevice(8 * MiB, 5 * MiB)
    own = jax.device_put(np.zeros(N, np.float32), jax.devices()[0])  # a 1 MiB state on id 0
    admission = Admission(None, lambda: pytest.fail("no resident scan on such a device"),
                          devices=[device], value_of={"own": own}.get)
    assert admission.enabled  # without --device-memory
    assert admission.check(Demand(3 * MiB, (0,))).fits
    verdict = admission.check(Demand(4 * MiB, (0,)))
    assert (verdict.fits, verdict.free, verdict.source) == (False, 3 * MiB,
                                                            "device.memory_stats()")
    assert admission.check(Demand(4 * MiB, (0,)), ["own"]).fits  # its 1 MiB is in use already
    device.in_use = 7 * MiB  # another process (or a fragment) took memory
    assert not admission.check(Demand(3 * MiB, (0,))).fits
    assert admission.check(Demand(9 * MiB, (0,))).never


def test_a_failed_first_call_leaves_no_callable_bound_to_its_uploads(server):
    """A first call that uploads a new state and fails is rolled back; the callable it
    cached referred to that never-committed state, so it is forgotten: the call sent again
    (with its upload again) runs on the state that is committed. (A call sent back to the
    queue for memory is rolled back the same way.)"""
    s = server()
    with s.connect() as client:
        w = statehost.ParamState(jnp.zeros(4, jnp.float32))

        def step(x):
            if x.shape == (3,):
                raise ValueError("not three")
            w.value = w.value + x
            return w.value

        f = client.jit(step)
        with pytest.raises(ValueError, match="not three"):
            np.asarray(f(np.ones(3, np.float32)))
        np.testing.assert_array_equal(np.asarray(f(np.ones(4, np.float32))),
                                      np.ones(4, np.float32))
        client.pull(w)
        np.testing.assert_array_equal(np.asarray(w.value), np.ones(4, np.float32))


def test_asynchronous_calls_that_do_not_fit_wait_and_then_run_in_order(server):
    """Warm calls go over the call stream, where a channel runs its calls back to back on
    one worker: one that does not fit goes back to the scheduler's queue all the same."""
    s = server(device_memory=8 * MiB, workers=2, session_workers=2)
    a, b = s.connect(), s.connect()
    w = statehost.ParamState(jnp.zeros(N, jnp.float32))
    grow = b.jit(_grow(w))
    assert _first(grow()) == 1.0  # the first call of the signature: blocking, and it fits
    a.push(statehost.ParamState(jnp.zeros(6 * N, jnp.float32)))  # now it does not
    outs = [grow() for _ in range(3)]  # asynchronous: they return at once
    until(lambda: _waiting_for_memory(s))
    assert not any(o.is_ready() for o in outs)
    a.close()  # frees the 6 MiB
    assert [_first(o) for o in outs] == [2.0, 3.0, 4.0]
    assert float(np.asarray(w.value)[0]) == 4.0
    b.close()
