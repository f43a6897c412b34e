"""The scheduler's limits: deadlines (CallTimeoutError), cancellation, the bound on the
workers one session may hold, and the stuck calls listed in /v1/info and the metrics.

The workloads, the gate that holds workers and the in-process server are in
``tests/server/scheduling.py``, shared with test_fairness and test_admission.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client._errors import CallTimeoutError as ClientCallTimeoutError
from statehost.server.calls import Call, CallStatus
from statehost.server.errors import CallCancelledError, CallTimeoutError
from statehost.server.metrics import Metrics
from statehost.server.scheduler import Scheduler
from tests.server.scheduling import (
    TOKEN,
    blocked,
    metrics_text,
    quick_work,
    stuck_work,
    until,
    until_async,
)
from tests.serving import metric_value


# -- the bound on one session's workers --------------------------------------------------
def test_one_sessions_stuck_calls_leave_workers_to_other_sessions(gate, sessions, schedulers):
    create, _ = sessions

    async def main():
        scheduler = schedulers(2, session_workers=1)
        a, b = create(), create()
        stuck = [asyncio.ensure_future(scheduler.submit(Call("call", a, (), stuck_work)))
                 for _ in range(4)]
        await until_async(lambda: scheduler.running and scheduler.queued + scheduler.running
                           == 4)
        for _ in range(3):  # one after the other, on the worker a's queue does not hold
            assert await asyncio.wait_for(
                scheduler.submit(Call("call", b, (), quick_work)), 10) == 4.0
        assert (scheduler.running, scheduler.queued) == (1, 3)
        for call in scheduler.calls:  # one running, three queued
            with pytest.raises(RuntimeError, match=f"{call.id} is {call.status} already; a "
                               "Call is submitted once"):
                await scheduler.submit(call)
        assert scheduler.by_session() == {a.id[:8]: {"queued": 3, "running": 1}}
        gate.set()
        assert await asyncio.gather(*stuck) == [2.0] * 4
        assert (scheduler.running, scheduler.queued, scheduler.lock_count()) == (0, 0, 0)

    asyncio.run(main())


def test_without_the_bound_one_session_blocks_everyone(gate, sessions, schedulers):
    """What the bound prevents (issue 12): stuck calls of one session take every worker."""
    create, _ = sessions

    async def main():
        scheduler = schedulers(2, session_workers=2)
        a, b = create(), create()
        stuck = [asyncio.ensure_future(scheduler.submit(Call("call", a, (), stuck_work)))
                 for _ in range(2)]
        await until_async(lambda: scheduler.running == 2)
        other = Call("call", b, (), quick_work)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(scheduler.submit(other), 0.5)
        assert other.status is CallStatus.CANCELLED  # the awaiter gave up: never started
        gate.set()
        await asyncio.gather(*stuck)

    asyncio.run(main())


def test_server_work_is_not_bound_by_a_session(gate, sessions, schedulers):
    async def main():
        scheduler = schedulers(2, session_workers=1)
        first = asyncio.ensure_future(scheduler.submit(Call("flush", None, (), stuck_work)))
        second = asyncio.ensure_future(scheduler.submit(Call("flush", None, (), stuck_work)))
        await until_async(lambda: scheduler.running == 2)
        gate.set()
        assert await asyncio.gather(first, second) == [2.0, 2.0]

    asyncio.run(main())


# -- deadlines ------------------------------------------------------------------------
def test_a_call_queued_past_its_deadline_is_dropped_and_never_started(gate, sessions, schedulers):
    create, _ = sessions
    metrics = Metrics()

    async def main():
        scheduler = schedulers(1, metrics=metrics)
        holder = asyncio.ensure_future(scheduler.submit(Call("call", create(), (), stuck_work)))
        await until_async(lambda: scheduler.running == 1)
        ran = []
        late = Call("call", create(), ("x",), ran.append, timeout=0.2)
        with pytest.raises(CallTimeoutError) as caught:
            await scheduler.submit(late)
        assert caught.value.status == 408
        message = caught.value.message
        assert "not started within its 0.2 s deadline (its own timeout)" in message
        assert "was never started, so nothing was applied" in message
        assert "in the queue for a free worker: all 1 were busy" in message
        waited = caught.value.extra["waited_s"]
        assert 0.2 <= waited < 5 and f"waited {waited:.3g}"[:11] in message
        assert not ran and late.status is CallStatus.CANCELLED and late.error is caught.value
        assert (scheduler.queued, scheduler.lock_count()) == (0, 0)
        gate.set()
        assert await holder == 2.0

    asyncio.run(main())
    assert metric_value(metrics_text(metrics), "statehost_call_timeouts_total") == 1
    assert metric_value(metrics_text(metrics), "statehost_call_queue_seconds_count") == 1


def test_the_timeout_message_says_what_the_call_waited_for(gate, sessions, schedulers):
    create, _ = sessions

    async def main():
        scheduler = schedulers(2, session_workers=1, call_timeout=0.2)
        a = create()
        holder = asyncio.ensure_future(scheduler.submit(Call("call", a, ("x",), stuck_work)))
        await until_async(lambda: scheduler.running == 1)
        with pytest.raises(CallTimeoutError, match=r"\(the server's default, --call-timeout\)"
                           r".* for its session's turn: the session was running 1 call"):
            await scheduler.submit(Call("call", a, (), quick_work))
        with pytest.raises(CallTimeoutError, match=r"for 1 of its 2 state\(s\), held by "
                           "running calls"):
            await scheduler.submit(Call("call", create(), ("x", "y"), quick_work))
        gate.set()
        await holder

    asyncio.run(main())


def test_a_running_call_past_its_deadline_runs_on_with_cancel_requested(gate, sessions, schedulers):
    create, _ = sessions

    async def main():
        scheduler = schedulers(1)
        call = Call("call", create(), (), stuck_work, timeout=0.05)
        task = asyncio.ensure_future(scheduler.submit(call))
        await until_async(lambda: call.status is CallStatus.RUNNING)
        await until_async(call.is_past_deadline)
        assert call.should_stop() and not call.cancel_requested
        described = call.describe()
        assert (described["status"], described["cancel_requested"]) == ("running", True)
        assert scheduler.stuck(after=3600) == [call]  # past its deadline: stuck already
        gate.set()
        assert await task == 2.0  # one device program: not interrupted (openxla/xla#16801)
        assert call.status is CallStatus.COMMITTED

    asyncio.run(main())


def test_the_server_default_applies_to_calls_without_a_timeout_of_their_own(sessions, schedulers):
    create, _ = sessions

    async def main():
        scheduler = schedulers(1, call_timeout=5)
        plain, own, none = (Call("call", create(), (), lambda c: c.deadline),
                            Call("call", create(), (), lambda c: c.deadline, timeout=1),
                            Call("call", create(), (), lambda c: c.deadline, timeout=math.inf))
        assert await scheduler.submit(plain) == pytest.approx(plain.created + 5)
        assert await scheduler.submit(own) == pytest.approx(own.created + 1)
        assert await scheduler.submit(none) is None
        off = schedulers(1, call_timeout=0)
        assert await off.submit(Call("call", create(), (), lambda c: c.deadline)) is None
        off.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize("timeout", [0, -1, math.nan, "10", True])
def test_a_timeout_must_be_a_positive_number(timeout):
    with pytest.raises(ValueError, match=r"Call\(timeout=.*\): a timeout is the seconds a "
                       r"call may take from its creation, a number > 0"):
        Call("call", None, (), lambda c: None, timeout=timeout)


def test_a_scheduler_needs_a_worker():
    with pytest.raises(ValueError, match=r"Scheduler\(workers=0\): at least one worker"):
        Scheduler(0)


# -- cancellation -------------------------------------------------------------------------
def test_a_cancelled_queued_call_never_starts(gate, sessions, schedulers):
    create, _ = sessions
    metrics = Metrics()

    async def main():
        scheduler = schedulers(1, metrics=metrics)
        holder = asyncio.ensure_future(scheduler.submit(Call("call", create(), (), stuck_work)))
        await until_async(lambda: scheduler.running == 1)
        ran = []
        queued = Call("call", create(), ("x",), ran.append)
        task = asyncio.ensure_future(scheduler.submit(queued))
        await until_async(lambda: scheduler.queued == 1)
        assert queued.request_cancel() is CallStatus.CANCELLED and queued.cancel_requested
        with pytest.raises(CallCancelledError, match="cancelled before it started .* nothing "
                           "was applied") as caught:
            await task
        assert caught.value.status == 409
        assert scheduler.queued == 0
        assert queued.request_cancel() is CallStatus.CANCELLED  # again: nothing changes
        gate.set()
        await holder
        assert not ran
        with pytest.raises(CallCancelledError):  # cancelled before it was even submitted
            await scheduler.submit(queued)

    asyncio.run(main())
    assert metric_value(metrics_text(metrics), "statehost_call_cancellations_total",
                        when="queued") == 1


def test_cancelling_a_running_call_asks_its_steps_to_stop(sessions, schedulers):
    create, _ = sessions
    metrics = Metrics()
    started = threading.Event()

    def steps(call: Call) -> int:
        done = 0
        started.set()
        while not call.should_stop():  # a server-side loop checks between device programs
            jax.block_until_ready(jnp.ones(2) * done)
            done += 1
        return done

    async def main():
        scheduler = schedulers(1, metrics=metrics)
        call = Call("loop", create(), (), steps)
        task = asyncio.ensure_future(scheduler.submit(call))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
        assert call.request_cancel() is CallStatus.RUNNING and call.cancel_requested
        assert call.cancel() is False  # the old spelling leaves a running call alone
        assert await task >= 1
        assert call.status is CallStatus.COMMITTED
        assert call.request_cancel() is CallStatus.COMMITTED  # finished: left as it is

    asyncio.run(main())
    assert metric_value(metrics_text(metrics), "statehost_call_cancellations_total",
                        when="running") == 1


def test_an_abandoned_await_cancels_a_queued_call(gate, sessions, schedulers):
    create, _ = sessions

    async def main():
        scheduler = schedulers(1)
        holder = asyncio.ensure_future(scheduler.submit(Call("call", create(), (), stuck_work)))
        await until_async(lambda: scheduler.running == 1)
        ran = []
        queued = Call("call", create(), (), ran.append)
        task = asyncio.ensure_future(scheduler.submit(queued))
        await until_async(lambda: scheduler.queued == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert queued.status is CallStatus.CANCELLED and scheduler.queued == 0
        gate.set()
        await holder
        assert not ran

    asyncio.run(main())


# -- order ----------------------------------------------------------------------------------
def test_a_call_waiting_for_a_state_is_not_overtaken_on_its_states(gate, sessions, schedulers):
    create, _ = sessions
    order: list[str] = []

    def note(name: str, work: Callable[[Call], object] | None = None):
        def run(call: Call) -> object:
            order.append(name)
            return work(call) if work else name
        return run

    async def main():
        scheduler = schedulers(4, session_workers=4)
        s = create()
        tasks = [asyncio.ensure_future(scheduler.submit(Call("call", s, ("x",),
                                                             note("x", stuck_work))))]
        await until_async(lambda: scheduler.running == 1)
        tasks.append(asyncio.ensure_future(scheduler.submit(Call("call", s, ("x", "y"),
                                                                 note("xy")))))
        tasks.append(asyncio.ensure_future(scheduler.submit(Call("call", s, ("y",),
                                                                 note("y")))))
        assert await scheduler.submit(Call("call", s, ("z",), note("z"))) == "z"
        assert order == ["x", "z"]  # "y" waits behind "xy", which waits for "x"
        gate.set()
        await asyncio.gather(*tasks)
        assert order == ["x", "z", "xy", "y"]

    asyncio.run(main())


def test_shutdown_drops_the_queue(gate, sessions, schedulers):
    create, _ = sessions

    async def main():
        scheduler = schedulers(1)
        holder = asyncio.ensure_future(scheduler.submit(Call("call", create(), (), stuck_work)))
        await until_async(lambda: scheduler.running == 1)
        queued = asyncio.ensure_future(scheduler.submit(Call("call", create(), (), quick_work)))
        await until_async(lambda: scheduler.queued == 1)
        loop = asyncio.get_running_loop()
        done = loop.run_in_executor(None, scheduler.shutdown)  # waits for the running call
        with pytest.raises(CallCancelledError, match="shutting down"):
            await queued
        gate.set()
        await done
        assert await holder == 2.0
        with pytest.raises(CallCancelledError, match="shutting down"):
            await scheduler.submit(Call("call", create(), (), quick_work))

    asyncio.run(main())


def test_stuck_calls_of_one_client_leave_the_server_to_the_others(server, gate):
    s = server(workers=2, session_workers=1, stuck_after=0.05)
    with s.connect() as a, s.connect() as b:
        step = a.jit(blocked)
        assert float(step(np.float32(0))) == 1.0  # caches the function; passes the gate
        sent = s.stuck_calls(a, step, 3)
        until(lambda: (s.scheduler.running, s.scheduler.queued) == (1, 2))
        assert float(b.jit(lambda x: x * 2)(np.float32(3))) == 6.0
        until(lambda: s.http.get("/v1/info").json()["calls"]["stuck"])
        calls = s.http.get("/v1/info").json()["calls"]
        assert (calls["queued"], calls["running"]) == (2, 1)
        (listed,) = calls["stuck"]
        running_id = listed["id"]
        assert set(listed) == {"id", "kind", "session", "age_s", "running_s",
                               "cancel_requested"}
        assert (listed["kind"], listed["session"]) == ("call", a._session[:8])
        assert listed["running_s"] >= 0.05 and not listed["cancel_requested"]
        assert s.metric("statehost_session_calls", session=a._session[:8], status="queued") == 2
        assert s.metric("statehost_session_calls", session=a._session[:8], status="running") == 1
        assert s.metric("statehost_calls_stuck") == 1
        limits = s.http.get("/v1/info").json()["limits"]
        assert (limits["workers"], limits["session_workers"]) == (2, 1)

        started = s.metric("statehost_call_queue_seconds_count")

        # the cancel route: a queued call never starts, a running one is asked to stop
        queued_id = next(i for i, _, _ in sent if i != running_id)
        answer = s.http.post(f"/v1/calls/{queued_id}/cancel")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"id": queued_id, "status": "cancelled",
                                 "cancel_requested": True}
        answer = s.http.post(f"/v1/calls/{running_id}/cancel")
        assert answer.json() == {"id": running_id, "status": "running",
                                 "cancel_requested": True}
        (listed,) = s.http.get("/v1/info").json()["calls"]["stuck"]
        assert listed["cancel_requested"]
        gate.set()
        for _, thread, _ in sent:
            thread.join(60)
        replies = {i: answer[0] for i, _, answer in sent}
        assert replies[running_id].status_code == 200  # one device program runs to its end
        cancelled = replies[queued_id].json()["error"]
        assert replies[queued_id].status_code == 409
        assert cancelled["type"] == "CallCancelledError"
        assert "nothing was applied" in cancelled["message"]
        assert [r.status_code for i, r in replies.items()
                if i not in (running_id, queued_id)] == [200]
        assert s.metric("statehost_call_cancellations_total", when="queued") == 1
        assert s.metric("statehost_call_cancellations_total", when="running") == 1
        # of the two queued calls only the one not cancelled started
        assert s.metric("statehost_call_queue_seconds_count") == started + 1
        assert s.metric("statehost_session_calls", session=a._session[:8],
                        status="queued") == 0
        assert s.http.get("/v1/info").json()["calls"] == {"queued": 0, "running": 0,
                                                          "stuck": []}


def test_without_the_session_bound_the_other_client_waits(server, gate):
    """The failure the bound fixes: with session_workers = workers, two stuck calls of one
    client hold both workers and another client's call cannot start."""
    s = server(workers=2, session_workers=2)
    with s.connect() as a, s.connect() as b:
        step = a.jit(blocked)
        step(np.float32(0))
        sent = s.stuck_calls(a, step, 2)
        until(lambda: s.scheduler.running == 2)
        other = b.jit(lambda x: x * 2)
        result: list = []
        thread = threading.Thread(target=lambda: result.append(float(other(np.float32(3)))))
        thread.start()
        thread.join(1.0)
        assert thread.is_alive() and not result
        gate.set()
        thread.join(60)
        assert result == [6.0]
        for _, t, _ in sent:
            t.join(60)


def test_a_call_queued_past_the_default_deadline_answers_408(server, gate):
    s = server(workers=2, session_workers=1, call_timeout=0.3)
    with s.connect() as a:
        step = a.jit(blocked)
        step(np.float32(0))
        (sent,) = s.stuck_calls(a, step, 1)
        until(lambda: s.scheduler.running == 1)
        with pytest.raises(ClientCallTimeoutError, match="was never started, so nothing was "
                           "applied") as caught:
            # the same session: it waits for its turn, past the deadline (float: the error
            # of an asynchronous call is raised where its output is read)
            float(step(np.float32(0)))
        assert caught.value.status == 408 and "its session's turn" in str(caught.value)
        until(lambda: s.http.get("/v1/info").json()["calls"]["stuck"])
        (listed,) = s.http.get("/v1/info").json()["calls"]["stuck"]  # past its deadline
        assert listed["id"] == "stuck-0" and listed["cancel_requested"]
        assert s.metric("statehost_call_timeouts_total") == 1
        gate.set()
        sent[1].join(60)
        assert sent[2][0].status_code == 200
        assert float(step(np.float32(0))) == 1.0


def test_only_the_calls_owner_may_cancel_it(server, gate):
    s = server(workers=1)
    with s.connect() as a:
        step = a.jit(blocked)
        step(np.float32(0))
        ((call_id, thread, answer),) = s.stuck_calls(a, step, 1)
        until(lambda: s.scheduler.running == 1)
        other = s.token("b", "submit")
        reader = s.token("b", "read")
        for token, status in [(other, 404), (reader, 403), (TOKEN, 200)]:
            response = s.http.post(f"/v1/calls/{call_id}/cancel",
                                   headers={"authorization": f"Bearer {token}"})
            assert response.status_code == status, response.text
        error = s.http.post(f"/v1/calls/{call_id}/cancel", headers={
            "authorization": f"Bearer {other}"}).json()["error"]
        assert error["type"] == "CallNotFoundError"
        assert f"no queued or running call {call_id} of this token's sessions" in \
            error["message"]
        missing = s.http.post("/v1/calls/no-such-call/cancel").json()["error"]
        assert missing["type"] == "CallNotFoundError"
        gate.set()
        thread.join(60)
        assert answer[0].status_code == 200
        finished = s.http.post(f"/v1/calls/{call_id}/cancel")  # finished: no longer found
        assert finished.status_code == 404


def test_under_load_no_state_is_shared_no_bound_exceeded_and_nothing_leaks(sessions, schedulers):
    """Many calls of a few sessions on a few states, with short deadlines and cancels mixed
    in: two running calls never share a state, no session runs more than its bound, and
    the scheduler is empty at the end."""
    import random

    create, _ = sessions
    rng = random.Random(12)
    guard = threading.Lock()
    holding: dict[str, int] = {}
    per_session: dict[str, int] = {}
    problems: list[str] = []
    ran: list[int] = []

    def work(n: int, keys: tuple[str, ...], sid: str, pause: float):
        def run(call: Call) -> int:
            with guard:
                problems.extend(f"{k} shared" for k in keys if holding.get(k))
                holding.update({k: 1 for k in keys})
                per_session[sid] = per_session.get(sid, 0) + 1
                if per_session[sid] > 2:
                    problems.append(f"session {sid} ran {per_session[sid]}")
            time.sleep(pause)
            with guard:
                holding.update({k: 0 for k in keys})
                per_session[sid] -= 1
                ran.append(n)
            return n
        return run

    async def main():
        scheduler = schedulers(4, session_workers=2)
        people = [create() for _ in range(5)]
        calls, tasks = [], []
        for n in range(200):
            s = rng.choice(people)
            keys = tuple(rng.sample("abcdefg", rng.randint(0, 2)))
            timeout = rng.choice([None, None, 0.002, 0.05])
            call = Call("call", s, keys, work(n, keys, s.id, rng.choice([0, 0.001])),
                        timeout=timeout)
            calls.append(call)
            tasks.append(asyncio.ensure_future(scheduler.submit(call)))
            if rng.random() < 0.1:
                await asyncio.sleep(0)
                rng.choice(calls).request_cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert not problems, problems
        for n, (call, outcome) in enumerate(zip(calls, outcomes, strict=True)):
            if call.status is CallStatus.COMMITTED:
                assert outcome == n
            else:
                assert call.status is CallStatus.CANCELLED and n not in ran
                assert isinstance(outcome, CallTimeoutError | CallCancelledError)
        assert sorted(ran) == [n for n, c in enumerate(calls) if c.status is
                               CallStatus.COMMITTED]
        assert any(isinstance(o, CallTimeoutError) for o in outcomes)
        assert any(isinstance(o, CallCancelledError) for o in outcomes)
        assert (scheduler.queued, scheduler.running, scheduler.lock_count()) == (0, 0, 0)
        assert not scheduler._queue and not scheduler._awaiters and not scheduler._per_session
        assert scheduler._busy == 0

    asyncio.run(main())


def test_the_cancel_route_stops_a_running_loop_between_steps(server):
    """A job's loop is one scheduler Call with the job's id: it is listed while it runs, and
    cancelling the call stops it at its next step (the job says how far it got)."""
    from statehost.client import JobCancelledError

    s = server(stuck_after=0.05)
    with s.connect() as client:
        w = statehost.ParamState(jnp.zeros((), jnp.int32))

        def step():
            jax.debug.callback(lambda: time.sleep(0.02))
            w.value = w.value + 1
            return w.value

        job = client.loop(client.jit(step), 10_000, wait=False, progress=False)
        until(lambda: s.http.get("/v1/info").json()["calls"]["stuck"])
        (listed,) = s.http.get("/v1/info").json()["calls"]["stuck"]
        assert (listed["id"], listed["kind"]) == (job.id, "loop")
        answer = s.http.post(f"/v1/calls/{job.id}/cancel").json()
        assert answer == {"id": job.id, "status": "running", "cancel_requested": True}
        with pytest.raises(JobCancelledError, match=r"was cancelled after \d+ of 10000") as info:
            job.result()
        assert 0 < info.value.completed < 10_000 and int(w.value) == info.value.completed
