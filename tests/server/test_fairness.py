"""Fair scheduling between tenants: namespaces take turns (weighted round-robin), so one
tenant's flood of calls does not starve another's; per-state order and the per-session
bound still hold, and a namespace whose calls are all blocked blocks no one.

Orders are asserted, never timings: one worker, a first call held at the gate while the
rest are queued, then the order in which the calls start.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from statehost.server.calls import OPERATOR_QUEUE, SERVER_QUEUE, Call
from statehost.server.metrics import Metrics
from tests.server.scheduling import GATE, blocked, metrics_text, tenant, until, until_async
from tests.serving import metric_value


def _noting(order: list[str], name: str):
    """Work that records its start, then holds its worker until the gate opens (the
    "slow" call: once the gate is open the rest run one after the other)."""

    def run(call: Call) -> str:
        order.append(name)
        GATE.wait(60)
        return name

    return run


async def _flood(scheduler, calls: list[Call]) -> list:
    """Submits ``calls`` in order, the first one holding the only worker at the gate until
    every other one is queued; returns their results."""
    first = asyncio.ensure_future(scheduler.submit(calls[0]))
    await until_async(lambda: scheduler.running == 1)
    rest = [asyncio.ensure_future(scheduler.submit(c)) for c in calls[1:]]
    await asyncio.sleep(0)  # each task queues its call at its first step
    assert scheduler.queued == len(calls) - 1
    GATE.set()
    return await asyncio.gather(first, *rest)


@pytest.mark.parametrize(("b_namespace", "b_starts_at"), [
    ("b", 1),  # fair: B's call waits only for the running call (A had the box alone)
    ("a", 201),  # one namespace (what fairness fixes): behind all of A's calls
])
def test_a_flooding_tenant_does_not_starve_another(gate, sessions, schedulers, b_namespace,
                                                   b_starts_at):
    _, table = sessions
    order: list[str] = []

    async def main():
        scheduler = schedulers(1)
        a = [tenant(table, "a") for _ in range(4)]  # several sessions: the bound is no help
        b = tenant(table, b_namespace)
        calls = [Call("call", a[i % 4], (f"a{i}",), _noting(order, f"a{i}"))
                 for i in range(201)]  # disjoint states: only the worker is contended
        calls.append(Call("call", b, ("b",), _noting(order, "b")))
        assert await _flood(scheduler, calls) == [*(f"a{i}" for i in range(201)), "b"]

    asyncio.run(main())
    assert order.index("b") == b_starts_at
    assert [n for n in order if n != "b"] == [f"a{i}" for i in range(201)]  # FIFO within A


def test_weights_give_a_namespace_that_many_starts_per_turn(gate, sessions, schedulers):
    _, table = sessions
    order: list[str] = []

    async def main():
        scheduler = schedulers(1, weight=lambda ns: {"a": 3}.get(ns, 1))
        a, b = tenant(table, "a"), tenant(table, "b")
        calls = [Call("call", a, (f"a{i}",), _noting(order, "a")) for i in range(30)]
        calls += [Call("call", b, (f"b{i}",), _noting(order, "b")) for i in range(30)]
        await _flood(scheduler, calls)

    asyncio.run(main())
    assert "".join(order[:20]) == "aaab" * 5
    assert "".join(order[-10:]) == "b" * 10  # A's queue is empty: B takes every turn


def test_a_namespace_that_had_the_box_alone_yields_its_turn_at_once(gate, sessions,
                                                                     schedulers):
    """A (weight 3) starts calls alone: its starts count on past its weight, so B's call,
    when it comes, starts at the next free worker, before A's next; then the turns are
    A's weight to B's one again."""
    _, table = sessions
    order: list[str] = []

    async def main():
        scheduler = schedulers(1, weight=lambda ns: {"a": 3}.get(ns, 1))
        a, b = tenant(table, "a"), tenant(table, "b")
        for i in range(5):  # alone: one after the other, none queued in between
            assert await scheduler.submit(Call("call", a, (f"x{i}",),
                                               lambda c, i=i: order.append(f"a{i}"))) is None
        calls = [Call("call", a, (f"a{i}",), _noting(order, "a")) for i in range(8)]
        calls += [Call("call", b, (f"b{i}",), _noting(order, "b")) for i in range(2)]
        await _flood(scheduler, calls)

    asyncio.run(main())
    assert order[:5] == [f"a{i}" for i in range(5)]
    assert "".join(order[5:]) == "a" + "b" + "aaa" + "b" + "aaaa"


def test_a_namespace_whose_calls_are_blocked_blocks_no_one(gate, sessions, schedulers):
    """A's head call waits for a state A's running call holds, and A's other call for its
    session's bound: B's call takes the free worker at once."""
    _, table = sessions
    order: list[str] = []

    async def main():
        scheduler = schedulers(2, session_workers=1)
        a1, a2, b = tenant(table, "a"), tenant(table, "a"), tenant(table, "b")
        running = asyncio.ensure_future(scheduler.submit(Call("call", a1, ("x",),
                                                              _noting(order, "a-x"))))
        await until_async(lambda: scheduler.running == 1)
        waiting = [asyncio.ensure_future(scheduler.submit(Call("call", a2, ("x",),
                                                               _noting(order, "a-x2")))),
                   asyncio.ensure_future(scheduler.submit(Call("call", a1, ("w",),
                                                               _noting(order, "a-w"))))]
        await asyncio.sleep(0)
        assert scheduler.queued == 2
        assert await scheduler.submit(Call("call", b, ("y",), lambda c: "b-y")) == "b-y"
        assert scheduler.by_namespace() == {"a": {"queued": 2, "running": 1}}
        GATE.set()
        await asyncio.gather(running, *waiting)

    asyncio.run(main())
    assert order[0] == "a-x" and sorted(order[1:]) == ["a-w", "a-x2"]


def test_calls_of_two_namespaces_on_one_state_keep_their_arrival_order(gate, sessions,
                                                                       schedulers):
    _, table = sessions
    order: list[str] = []

    async def main():
        scheduler = schedulers(2, session_workers=2)
        a, b = tenant(table, "a"), tenant(table, "b")
        calls = [Call("call", a, ("x",), _noting(order, "a1")),
                 Call("call", b, ("x",), _noting(order, "b1")),
                 Call("call", a, ("x",), _noting(order, "a2")),
                 Call("call", a, ("x", "y"), _noting(order, "a3")),
                 Call("call", b, ("y",), _noting(order, "b2"))]
        first = asyncio.ensure_future(scheduler.submit(calls[0]))
        await until_async(lambda: scheduler.running == 1)
        rest = [asyncio.ensure_future(scheduler.submit(c)) for c in calls[1:]]
        await asyncio.sleep(0)
        assert (scheduler.running, scheduler.queued) == (1, 4)  # b2 waits behind a3 on y
        GATE.set()
        await asyncio.gather(first, *rest)

    asyncio.run(main())
    assert [n for n in order if n != "b2"] == ["a1", "b1", "a2", "a3"]
    assert order.index("b2") > order.index("a3")


def test_operator_tokens_and_the_servers_own_work_have_queues_of_their_own(gate, sessions,
                                                                           schedulers):
    _, table = sessions
    metrics = Metrics()

    async def main():
        scheduler = schedulers(3, metrics=metrics)
        calls = [Call("call", tenant(table, None), (), _noting([], "op")),
                 Call("flush", None, (), _noting([], "server")),
                 Call("call", tenant(table, "team"), (), _noting([], "team"))]
        tasks = [asyncio.ensure_future(scheduler.submit(c)) for c in calls]
        await until_async(lambda: scheduler.running == 3)
        assert [c.namespace for c in calls] == [OPERATOR_QUEUE, SERVER_QUEUE, "team"]
        assert scheduler.by_namespace() == {ns: {"queued": 0, "running": 1}
                                            for ns in (OPERATOR_QUEUE, SERVER_QUEUE, "team")}
        GATE.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    text = metrics_text(metrics)
    for ns in (OPERATOR_QUEUE, SERVER_QUEUE, "team"):
        assert metric_value(text, "statehost_namespace_queue_seconds_count", namespace=ns) == 1


def test_info_and_metrics_show_each_namespaces_queue(server, gate):
    s = server(workers=2, session_workers=1, namespace_weights=(("a", 2),))
    token_a, token_b = s.token("a", "submit"), s.token("b", "submit")
    with s.connect(token_a) as a, s.connect(token_b) as b:
        step = a.jit(blocked)
        assert float(step(np.float32(0))) == 1.0  # caches the function; passes the gate
        sent = s.stuck_calls(a, step, 2, token=token_a)
        until(lambda: (s.scheduler.running, s.scheduler.queued) == (1, 1))
        assert float(b.jit(lambda x: x * 2)(np.float32(3))) == 6.0  # the free worker
        info = s.http.get("/v1/info").json()
        assert info["queues"] == {"a": {"queued": 1, "running": 1, "weight": 2}}
        GATE.set()
        for _, thread, _ in sent:
            thread.join(60)
        assert [answer[0].status_code for _, _, answer in sent] == [200, 200]
        assert s.http.get("/v1/info").json()["queues"] == {}
    assert s.metric("statehost_namespace_queue_seconds_count", namespace="a") == 3
    assert s.metric("statehost_namespace_queue_seconds_count", namespace="b") == 1


def test_a_weight_must_be_a_positive_integer():
    from statehost.server import Settings
    from statehost.server.settings import parse_weight

    assert Settings(namespace_weights=[("a", 3)]).weight_of("a") == 3
    assert Settings(namespace_weight=2).weight_of("other") == 2
    with pytest.raises(ValueError, match=r"namespace_weights\['a'\]=0 must be an integer >= 1"):
        Settings(namespace_weights=(("a", 0),))
    with pytest.raises(ValueError, match="namespace weight 'a:3' is not NAMESPACE=WEIGHT"):
        parse_weight("a:3")
    assert Settings.from_env({"STATEHOST_NAMESPACE_WEIGHTS": "a=3, b=2"}).namespace_weights \
        == (("a", 3), ("b", 2))


def test_threads_are_not_held_by_queued_calls(gate, sessions, schedulers):
    """The flood waits in the queue, not on threads: one worker thread exists throughout."""
    _, table = sessions

    async def main():
        scheduler = schedulers(1)
        before = threading.active_count()
        a = tenant(table, "a")
        calls = [Call("call", a, (f"s{i}",), _noting([], str(i))) for i in range(50)]
        first = asyncio.ensure_future(scheduler.submit(calls[0]))
        await until_async(lambda: scheduler.running == 1)
        rest = [asyncio.ensure_future(scheduler.submit(c)) for c in calls[1:]]
        await asyncio.sleep(0)
        assert threading.active_count() <= before + 1
        GATE.set()
        await asyncio.gather(first, *rest)

    asyncio.run(main())
