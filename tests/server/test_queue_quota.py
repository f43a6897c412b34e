"""``max_queued`` on every route that queues work, not only calls: with a namespace's queue
full, a put, a job and a JSON value write are refused at once with 429
QuotaExceededError naming the route; nothing is queued or changed, other namespaces go on,
and once the queue drains the same requests go through.

The queue is filled for real: two calls of ``blocked`` at the gate on one session
(``session_workers=1``), one running and one waiting (``max_queued=1``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client import NotFoundError, QuotaExceededError
from tests.server.scheduling import GATE, blocked, until

_REFUSED = (r"{where}: refused, the call was not queued: namespace 'team' has 1 call\(s\) "
            r"waiting in the server's queue, its quota max_queued=1\. Fix: wait")


@pytest.fixture
def full(server, gate):
    """A server whose namespace ``team`` has its one queued call waiting; yields the server,
    team's token, a second client of team (its own session), and that client's state
    ``team/n`` (at 1) with a step that increments it; team's named state ``w`` is a
    float32 vector of 3 zeros."""
    s = server(workers=2, session_workers=1)
    assert s.http.put("/v1/namespaces/team", json={"max_queued": 1}).status_code == 200
    team = s.token("team", "submit")
    with s.connect(team) as a, s.connect(team) as b:
        a.put("team/w", statehost.ParamState(jnp.zeros(3, jnp.float32)))
        n = statehost.ParamState(jnp.zeros((), jnp.int32))
        b.put("team/n", n)

        def inc():
            n.value = n.value + 1
            return n.value

        inc = b.jit(inc)
        assert int(inc()) == 1  # its states (the random stream's too) are resident now
        step = a.jit(blocked)
        assert float(step(np.float32(0))) == 1.0  # caches the function; passes the gate
        sent = s.stuck_calls(a, step, 2, token=team)
        until(lambda: (s.scheduler.running, s.scheduler.queued) == (1, 1))
        yield s, team, b, (n, inc)
        GATE.set()
        for _, thread, _ in sent:
            thread.join(60)
        assert [answer[0].status_code for _, _, answer in sent] == [200, 200]


def _value(s, team):
    got = s.http.get("/v1/namespaces/team/states/w/value",
                     headers={"authorization": f"Bearer {team}"})
    assert got.status_code == 200, got.text
    return got.json()


def test_a_put_is_refused_while_the_namespaces_queue_is_full(full):
    s, team, b, _ = full
    with pytest.raises(QuotaExceededError, match=_REFUSED.format(
            where=r"POST /v1/objects/put")) as info:
        b.put("team/v", statehost.ParamState(jnp.ones(3, jnp.float32)))
    assert info.value.status == 429
    assert (info.value.namespace, info.value.quota) == ("team", "max_queued")
    assert s.scheduler.queued == 1  # nothing was added
    with s.connect() as other:  # another namespace is not held up
        other.put("ops/v", statehost.ParamState(jnp.ones(3, jnp.float32)))
    GATE.set()
    until(lambda: s.scheduler.queued == 0)
    with pytest.raises(NotFoundError):
        b.get("team/v")  # the refused put placed nothing
    b.put("team/v", statehost.ParamState(jnp.ones(3, jnp.float32)))  # now it goes through
    np.testing.assert_array_equal(np.asarray(b.get("team/v").value), np.ones(3))


def test_a_job_is_refused_while_the_namespaces_queue_is_full(full):
    s, team, b, (n, step) = full
    with pytest.raises(QuotaExceededError, match=_REFUSED.format(where=r"POST /v1/jobs")) \
            as info:
        b.loop(step, 3, wait=False, progress=False)
    assert info.value.status == 429
    listed = s.http.get("/v1/jobs", headers={"authorization": f"Bearer {team}"}).json()
    assert listed == {"jobs": []}  # no job was made
    assert s.scheduler.queued == 1
    GATE.set()
    until(lambda: s.scheduler.queued == 0)
    assert int(n.value) == 1  # the refused job ran no step
    assert int(b.loop(step, 3, progress=False)) == 4  # the same loop runs now
    assert int(n.value) == 4


def test_a_json_value_write_is_refused_while_the_namespaces_queue_is_full(full):
    s, team, b, _ = full
    auth = {"authorization": f"Bearer {team}"}
    written = s.http.put("/v1/namespaces/team/states/w/value", json={"data": [1, 2, 3]},
                         headers=auth)
    assert written.status_code == 429, written.text
    assert written.json()["error"]["quota"] == "max_queued"
    assert "PUT /v1/namespaces/team/states/w/value: refused, the call was not queued" in \
        written.json()["error"]["message"]
    GATE.set()
    until(lambda: s.scheduler.queued == 0)
    before = _value(s, team)
    assert before["data"] == [0.0, 0.0, 0.0]  # the refused write changed nothing
    written = s.http.put("/v1/namespaces/team/states/w/value", json={"data": [1, 2, 3]},
                         headers=auth)
    assert written.status_code == 200, written.text
    assert _value(s, team)["version"] == before["version"] + 1
