"""``GET /v1/calls`` and ``GET /v1/calls/{id}``: a caller's calls with their wait in the
scheduler's queue and their run, while queued or running and after they finished.

Waits are never compared with a clock's idea of how long they should be: a queued call's
wait is checked against the interval the test itself held it back (it was queued before
the interval began and could not start before it ended), a bound no load can break.
"""

from __future__ import annotations

import time

import numpy as np

from tests.server.scheduling import TOKEN, blocked, until

FIELDS = {"id", "kind", "outcome", "namespace", "session", "queued_s", "running_s", "error",
          "finished", "compiled", "bytes_in", "bytes_out"}


def _get(s, path, token=TOKEN, **params):
    return s.http.get(path, params=params, headers={"authorization": f"Bearer {token}"})


def test_a_calls_record_shows_its_wait_in_the_queue_and_its_run(server, gate):
    s = server(workers=1)
    with s.connect() as a:
        step = a.jit(blocked)
        step(np.float32(0))  # caches the function; passes the gate
        sent = s.stuck_calls(a, step, 2)
        until(lambda: (s.scheduler.running, s.scheduler.queued) == (1, 1))
        records = {r["outcome"]: r for r in (_get(s, f"/v1/calls/{i}").json()
                                             for i, _, _ in sent)}
        assert set(records) == {"running", "queued"}
        running, queued = records["running"], records["queued"]
        assert set(running) == FIELDS and running["finished"] is None
        assert running["running_s"] >= 0 and queued["running_s"] is None
        assert queued["session"] == running["session"] == a._session[:8]
        assert (queued["namespace"], queued["kind"]) == (None, "call")  # an operator token
        gate.set()
        for _, thread, _ in sent:
            thread.join(60)
        done = [_get(s, f"/v1/calls/{i}").json() for i, _, _ in sent]
    for record in done:
        assert (record["kind"], record["outcome"], record["error"]) == ("call", "committed",
                                                                         None)
        assert record["finished"] is not None and record["running_s"] >= 0
        assert record["bytes_in"] > 0 and record["bytes_out"] > 0


def test_a_queued_calls_wait_covers_the_interval_it_was_held_back(server, gate):
    s = server(workers=1)
    with s.connect() as a:
        step = a.jit(blocked)
        step(np.float32(0))
        (first, t1, _), (second, t2, _) = s.stuck_calls(a, step, 2)
        until(lambda: s.scheduler.queued == 1)
        began = time.monotonic()
        until(lambda: time.monotonic() - began >= 0.02)  # hold it back 20 ms at least
        ended = time.monotonic()
        gate.set()
        t1.join(60)
        t2.join(60)
        record = _get(s, f"/v1/calls/{second}").json()
    # Queued before `began`, started after `ended` (the only worker was held until then);
    # the record rounds to 0.1 ms.
    assert ended - began >= 0.02
    assert record["queued_s"] >= ended - began - 1e-4


def test_a_token_sees_its_own_calls_and_no_one_elses(server):
    s = server(workers=2)
    other = s.token("b", "submit")
    with s.connect() as a, s.connect(other) as b:
        double = a.jit(lambda x: x * 2)
        outs = [double(np.float32(i)) for i in range(3)]  # the first is synchronous
        assert [float(o) for o in outs] == [0.0, 2.0, 4.0]
        b.jit(lambda x: x + 1)(np.float32(1))
        ids = [o.handle.split(":")[0] for o in outs]  # a RemoteArray's handle names its call
        mine = _get(s, "/v1/calls", last=50).json()
        calls = [r["id"] for r in mine if r["kind"] == "call"]
        # Latest to finish first (the two asynchronous calls may run as one run of calls
        # on one worker, the first of them finishing with the run).
        assert sorted(calls) == sorted(ids) and calls[-1] == ids[0]
        assert {r["session"] for r in mine} == {a._session[:8]}
        assert {r["kind"] for r in mine} >= {"call", "fetch"}  # reading an output is a call
        theirs = _get(s, "/v1/calls", token=other).json()
        assert theirs and {r["session"] for r in theirs} == {b._session[:8]}
        assert len(_get(s, "/v1/calls", last=2).json()) == 2


def test_another_tokens_call_is_not_found_and_bad_input_is_named(server):
    s = server(workers=1)
    other, reader = s.token("b", "submit"), s.token("b", "read")
    with s.connect() as a:
        out = a.jit(lambda x: x * 2)(np.float32(1))
        call_id = out.handle.split(":")[0]
        assert _get(s, f"/v1/calls/{call_id}").status_code == 200
        for token, status in [(other, 404), (reader, 403)]:
            assert _get(s, f"/v1/calls/{call_id}", token=token).status_code == status
        error = _get(s, f"/v1/calls/{call_id}", token=other).json()["error"]
        assert error["type"] == "CallNotFoundError"
        assert f"no call {call_id} of this token's sessions is queued, running or in the " \
               "server's call history" in error["message"]
        assert _get(s, "/v1/calls", token=other).json() == []
        bad = _get(s, "/v1/calls", last=0)
        assert bad.status_code == 422
        assert "GET /v1/calls: invalid request (query.last" in bad.json()["error"]["message"]
        assert float(out) == 2.0  # the server serves on
