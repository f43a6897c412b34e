"""Transfers (``Call.is_transfer``: a fetch of kept outputs, no state) take no worker: they
run on the scheduler's transfer threads, so reading a result never waits behind other
calls' device programs. Orders and outcomes are asserted, never timings."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import numpy as np
import pytest

from statehost.server.calls import Call, CallCancelled, CallStatus
from statehost.server.errors import CallTimeoutError
from tests.server.scheduling import GATE, blocked, quick_work, stuck_work, until, until_async


def _held(call: Call) -> str:
    GATE.wait(60)
    return "moved"


def test_a_transfer_runs_while_every_worker_is_held(gate, sessions, schedulers):
    create, _ = sessions

    async def main():
        scheduler = schedulers(1, session_workers=1)
        a, b = create(), create()
        holder = asyncio.ensure_future(scheduler.submit(Call("call", a, ("x",), stuck_work)))
        await until_async(lambda: scheduler.running == 1)
        behind = asyncio.ensure_future(scheduler.submit(Call("call", b, ("y",), quick_work)))
        await until_async(lambda: scheduler.queued == 1)
        # The worker is held and a call waits for it: the fetch runs at once all the same,
        # also one of the holder's own session (its bound counts workers, not transfers).
        for session in (b, a):
            fetch = Call("fetch", session, (), lambda call: "copied")
            assert fetch.is_transfer
            assert await asyncio.wait_for(scheduler.submit(fetch), 30) == "copied"
            assert fetch.status is CallStatus.COMMITTED
        assert (scheduler.running, scheduler.queued, scheduler.waiting) == (1, 1, True)
        assert not Call("fetch", b, ("y",), quick_work).is_transfer  # it locks a state
        gate.set()
        assert await holder == 2.0 and await behind == 4.0

    asyncio.run(main())


def test_transfers_wait_for_a_transfer_thread_and_say_so_past_their_deadline(
        gate, sessions, schedulers):
    create, _ = sessions

    async def main():
        scheduler = schedulers(1)
        moving = asyncio.ensure_future(scheduler.submit(Call("fetch", create(), (), _held)))
        await until_async(lambda: scheduler.running == 1)
        with pytest.raises(CallTimeoutError, match=r"in the queue for a free transfer thread: "
                           r"all 1 were busy copying other calls' outputs") as caught:
            await scheduler.submit(Call("fetch", create(), (), _held, timeout=0.1))
        assert "was never started, so nothing was applied" in caught.value.message
        # The worker is free for device work meanwhile.
        assert await scheduler.submit(Call("call", create(), ("x",), quick_work)) == 4.0
        queued = Call("fetch", create(), (), _held)
        task = asyncio.ensure_future(scheduler.submit(queued))
        await until_async(lambda: scheduler.queued == 1)
        assert not scheduler.waiting  # a transfer waits, for no worker: a run goes on
        assert queued.request_cancel() is CallStatus.CANCELLED
        with pytest.raises(CallCancelled):
            await task
        gate.set()
        assert await moving == "moved"
        assert (scheduler.running, scheduler.queued) == (0, 0)

    asyncio.run(main())


def test_reading_a_result_does_not_wait_for_another_clients_stuck_call(server, gate):
    s = server(workers=1, session_workers=1)
    with s.connect() as a, s.connect() as b:
        step = a.jit(blocked)
        step(np.float32(0))  # caches the function; passes the gate
        double = b.jit(lambda x: x * 2)
        double(np.float32(1))  # the first call of a signature is synchronous
        out = double(np.float32(3))  # asynchronous: a RemoteArray, read below
        b.sync()  # it ran; its output waits on the server
        (sent,) = s.stuck_calls(a, step, 1)
        until(lambda: s.scheduler.running == 1)  # the only worker is held
        read: concurrent.futures.Future = concurrent.futures.Future()
        threading.Thread(target=lambda: read.set_result(float(out)), daemon=True).start()
        assert read.result(timeout=30) == 6.0  # copied while the worker is still held
        assert s.scheduler.running == 1
        gate.set()
        sent[1].join(60)
        assert sent[2][0].status_code == 200
