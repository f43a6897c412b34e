"""Server-side loops and jobs through the real client and app (in process, no sockets)."""

import io
import json
import pickle
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
import statehost.client
from statehost.client import (
    Job,
    JobCancelledError,
    JobNotFoundError,
    RemoteExecutionError,
    ValidationError,
)
from statehost.server.persistence import Database
from statehost.transform import pmap
from statehost.wire import CONTENT_TYPE, LoopRequest, Section, pack
from statehost.wire._pickle import StateRef
from tests.core.models import PARAM, Affine
from tests.inprocess import TOKEN, URL, metric

LANES = 8


@pytest.fixture(autouse=True)
def _no_progress_bar(monkeypatch):
    monkeypatch.setenv("STATEHOST_PROGRESS", "0")


def _options():
    return dict(axis_name="i", state_in_axes={0: PARAM}, state_out_axes={0: PARAM})


def _deltas(steps):
    return np.arange(steps * LANES * 4, dtype=np.float32).reshape(steps, LANES, 4) / 100


def _versions(client, model):
    return client._ledger._base.get(model.weight.id)


# -- results ------------------------------------------------------------------------
@pytest.mark.parametrize("keep", ["last", "all"])
def test_loop_matches_a_local_loop_of_the_same_mapping(client, keep):
    remote_model, local_model = Affine(LANES), Affine(LANES)
    step = client.pmap(remote_model, **_options())
    local = pmap(local_model, **_options())
    deltas = _deltas(5)

    out = client.loop(step, 5, over=deltas, keep=keep)

    expected = [local(d) for d in deltas]
    expected = expected[-1] if keep == "last" else jnp.stack(expected)
    assert isinstance(out, jax.Array) and out.shape == expected.shape
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(remote_model.weight.value, local_model.weight.value, rtol=1e-6)


def test_args_are_the_same_each_step_and_over_comes_after_them(client):
    w = statehost.ParamState(jnp.zeros(3, jnp.float32))

    def step(scale, x, *, shift):
        w.value = w.value * scale + x + shift
        return w.value.sum()

    xs = np.arange(12, dtype=np.float32).reshape(4, 3)
    out = client.loop(client.jit(step), 4, np.float32(2.0), over=xs, keep="all",
                      shift=np.float32(1.0))

    expected, value = [], np.zeros(3, np.float32)
    for x in xs:
        value = value * 2 + x + 1
        expected.append(value.sum())
    np.testing.assert_allclose(out, expected)
    np.testing.assert_allclose(w.value, value)


def test_a_loop_without_over_runs_the_same_call_each_step(client):
    w = statehost.ParamState(jnp.zeros((), jnp.int32))

    def bump():
        w.value = w.value + 1
        return w.value

    assert int(client.loop(client.jit(bump), 7)) == 7
    assert int(w.value) == 7


def test_a_pytree_over_is_sliced_leaf_by_leaf(client):
    w = statehost.ParamState(jnp.zeros(2, jnp.float32))

    def step(batch):
        w.value = w.value + batch["a"] * batch["b"]
        return None

    over = {"a": np.ones((3, 2), np.float32), "b": np.arange(3, dtype=np.float32)}
    assert client.loop(client.jit(step), 3, over=over) is None
    np.testing.assert_allclose(w.value, [3.0, 3.0])


def test_each_step_commits_a_version(client):
    model = Affine(LANES)
    step = client.pmap(model, **_options())
    step(_deltas(1)[0])
    before = _versions(client, model)

    client.loop(step, 6, over=_deltas(6))

    assert _versions(client, model) == before + 6
    assert client.info is not None  # the client stays usable
    np.testing.assert_allclose(step(_deltas(1)[0]), model.weight.value)


def test_pull_false_leaves_the_states_on_the_server_until_pull(client):
    model = Affine(LANES)
    step = client.pmap(model, pull=False, **_options())
    client.loop(step, 3, over=_deltas(3))
    np.testing.assert_array_equal(model.weight.value, np.ones((LANES, 4)))

    client.pull(model)

    np.testing.assert_allclose(model.weight.value, 1 + _deltas(3).sum(0), rtol=1e-6)


def test_the_default_random_stream_advances_once_per_step(client):
    w = statehost.ParamState(jnp.zeros((4,), jnp.float32))

    def noisy():
        w.value = w.value + statehost.random.normal(size=(4,))
        return w.value

    statehost.random.seed(0)
    client.loop(client.jit(noisy), 3)
    remote = np.asarray(w.value)
    statehost.random.seed(0)
    local_w = statehost.ParamState(jnp.zeros((4,), jnp.float32))

    def local_noisy():
        local_w.value = local_w.value + statehost.random.normal(size=(4,))
        return local_w.value

    local = statehost.transform.jit(local_noisy)
    for _ in range(3):
        local()
    np.testing.assert_allclose(remote, local_w.value, rtol=1e-6)


# -- jobs ---------------------------------------------------------------------------
def test_wait_false_returns_a_job_with_status_progress_and_result(client):
    model = Affine(LANES)
    job = client.loop(client.pmap(model, **_options()), 4, over=_deltas(4), wait=False)

    assert isinstance(job, Job)
    out = job.result()

    assert job.done() and job.status == "completed" and job.progress == (4, 4)
    np.testing.assert_allclose(out, 1 + _deltas(4).sum(0), rtol=1e-6)
    np.testing.assert_allclose(model.weight.value, out)
    assert repr(job) == f"statehost.Job({job.id!r}, completed, 4/4 steps)"
    assert job.result() is out  # fetched once


def test_submit_runs_one_call_as_a_job(client):
    w = statehost.ParamState(jnp.ones(2, jnp.float32))

    def double(k):
        w.value = w.value * k
        return w.value

    job = client.submit(client.jit(double), np.float32(3.0))

    np.testing.assert_allclose(job.result(), [3.0, 3.0])
    np.testing.assert_allclose(w.value, [3.0, 3.0])
    assert job.progress == (1, 1)


def test_another_client_of_the_same_token_reattaches(client, transport):
    model = Affine(LANES)
    job = client.loop(client.pmap(model, **_options()), 3, over=_deltas(3), wait=False)
    job.result()

    with statehost.connect(URL, token=TOKEN, transport=transport) as other:
        again = other.job(job.id)
        np.testing.assert_allclose(again.result(), model.weight.value, rtol=1e-6)
        assert job.id in [j["id"] for j in other._http.json("GET", "/v1/jobs")["jobs"]]


def test_another_principals_job_is_not_found(app, client, transport):
    runtime = app.state.runtime
    db = Database(runtime.settings.data_dir / "statehost.db")
    other_token = db.create_token("team", "submit")
    db.close()
    runtime.tokens.reload()
    w = statehost.ParamState(jnp.zeros(()))
    job = client.submit(client.jit(lambda: setattr(w, "value", w.value + 1)))
    job.result()

    with statehost.connect(URL, token=other_token, transport=transport) as other:
        for request in (lambda: other.job(job.id),
                        lambda: other._http.json("GET", f"/v1/jobs/{job.id}/result"),
                        lambda: other._http.json("GET", f"/v1/jobs/{job.id}/events"),
                        lambda: other._http.json("POST", f"/v1/jobs/{job.id}/cancel")):
            with pytest.raises(JobNotFoundError, match="no job .* is visible to this token"):
                request()
        assert other._http.json("GET", "/v1/jobs") == {"jobs": []}
    assert job.status == "completed"


def test_an_unknown_job_is_not_found(client):
    with pytest.raises(JobNotFoundError, match="no job 0123456789abcdef is visible"):
        client.job("0123456789abcdef")


# -- failures, cancel, timeout --------------------------------------------------------
def test_over_without_steps_rows_is_refused_with_422(client):
    w = statehost.ParamState(jnp.zeros(2, jnp.float32))

    def step(x, y):
        w.value = w.value + x + y
        return None

    with pytest.raises(ValidationError, match=r"over=.*one row per step \(steps=3\); "
                                               r"over\[0\] has shape \(2, 2\)"):
        client.loop(client.jit(step), 3, over=(np.ones((2, 2)), np.ones((3, 2))))
    np.testing.assert_array_equal(w.value, [0.0, 0.0])


def test_bad_steps_and_keep_are_refused_before_sending(client):
    step = client.jit(lambda: None)
    with pytest.raises(ValueError, match=r"steps=0 must be an int >= 1"):
        client.loop(step, 0)
    with pytest.raises(ValueError, match=r"keep='first' must be one of 'last', 'all'"):
        client.loop(step, 2, keep="first")


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf"), 2e9, True, "5"])
def test_a_bad_timeout_is_refused_before_sending(client, timeout):
    # The wire's rule (0 < t <= 1e9), said where the caller wrote it: not a 400 later.
    with pytest.raises(ValueError, match=r"timeout=.* must be a number of seconds above 0 "
                                         r"\(at most 1e9\), or None"):
        client.loop(client.jit(lambda: None), 2, timeout=timeout)
    assert client._http.json("GET", "/v1/jobs") == {"jobs": []}


def test_a_failing_step_leaves_the_states_of_the_step_before_and_says_which(client):
    w = statehost.ParamState(jnp.zeros(1, jnp.float32))

    def grow(x):  # the state grows each step, so each step traces: the third one raises
        if w.value.shape[0] >= 3:
            raise ValueError("w is long enough")
        w.value = jnp.concatenate([w.value, x[None]])
        return w.value.sum()

    with pytest.raises(RemoteExecutionError, match=r"w is long enough.*step 3 of 5: the 2 "
                                                   r"step\(s\) before it committed") as info:
        client.loop(client.jit(grow), 5, over=np.arange(1, 6, dtype=np.float32))

    assert isinstance(info.value, ValueError)
    assert info.value.body["completed"] == 2 and info.value.body["step"] == 2
    np.testing.assert_array_equal(w.value, [0.0, 1.0, 2.0])  # pulled: step 2's values


def _slow_step(client, delay=0.02):
    """A counter and a jitted step adding one to it, sleeping ``delay`` s on the server."""
    w = statehost.ParamState(jnp.zeros((), jnp.int32))

    def step():
        jax.debug.callback(lambda: time.sleep(delay))
        w.value = w.value + 1
        return w.value

    return w, client.jit(step)


@pytest.fixture
def slow(client):
    """``(counter, step)`` of :func:`_slow_step`: a loop of N steps takes N x 20 ms at least."""
    return _slow_step(client)


def _running(job, steps=2):
    """``job``, once it has committed ``steps`` steps (it is running then)."""
    while job.progress[0] < steps:
        time.sleep(0.01)
    return job


def test_cancel_stops_between_steps_and_states_are_at_a_completed_step(client, slow):
    w, step = slow
    job = _running(client.loop(step, 10_000, wait=False), 3)

    job.cancel()

    with pytest.raises(JobCancelledError, match=r"was cancelled after (\d+) of 10000 step") \
            as info:
        job.result()
    done = info.value.completed
    assert 3 <= done < 10_000 and job.status == "cancelled" and job.progress == (done, 10_000)
    assert int(w.value) == done  # pulled: the states of the last completed step


def test_timeout_stops_the_loop_between_steps(client, slow):
    w, step = slow

    with pytest.raises(JobCancelledError, match=r"stopped by its timeout of 0.3 s after") \
            as info:
        client.loop(step, 10_000, timeout=0.3)

    assert info.value.reason == "timeout" and 0 < info.value.completed < 10_000
    assert int(w.value) == info.value.completed


def test_a_queued_job_cancelled_never_runs(client, slow):
    w, step = slow
    first = client.loop(step, 10_000, wait=False)
    second = client.loop(step, 5, wait=False)  # the same state: it waits for the first
    assert second.status == "queued"

    second.cancel()
    first.cancel()

    with pytest.raises(JobCancelledError, match=r"after 0 of 5 step\(s\).*none ran"):
        second.result()
    with pytest.raises(JobCancelledError):
        first.result()
    assert int(w.value) == first.progress[0]


def test_result_of_a_running_job_is_409(client, slow):
    _, step = slow
    job = _running(client.loop(step, 10_000, wait=False), 1)
    try:
        with pytest.raises(statehost.client.ClientError, match="is running") as info:
            client._http.json("GET", f"/v1/jobs/{job.id}/result")
        assert info.value.status == 409 and info.value.body["type"] == "JobNotDoneError"
    finally:
        job.cancel()
    with pytest.raises(JobCancelledError):
        job.result()


def test_closing_the_session_keeps_its_states_until_its_jobs_end(app, client, transport, slow):
    rt = app.state.runtime
    w, step = slow
    job = _running(client.loop(step, 30, wait=False))
    session = next(j.session for j in app.state.jobs.going() if j.id == job.id)

    closed = client._http.client.delete(f"/v1/sessions/{client._session}")

    assert closed.status_code == 202, closed.text
    assert closed.json()["jobs"] == 1 and re.search(
        r"closed to requests, but 1 job\(s\) of it still run: its states stay resident until "
        r"the last one ends", closed.json()["message"])
    assert rt.store.meta(w.id) is not None and session.closing is not None
    with pytest.raises(statehost.client.SessionNotFoundError, match="is not open"):
        client._http.json("DELETE", f"/v1/sessions/{client._session}")  # closed is closed
    with statehost.connect(URL, token=TOKEN, transport=transport) as other:
        again = other.job(job.id)
        assert int(again.result()) == 30  # every step ran on the kept states
        assert rt.store.meta(w.id) is None and not session.states  # freed when it ended
        assert metric(other, "statehost_resident_states") == len(rt.store)


def test_a_closed_session_is_freed_when_the_last_of_its_jobs_ends(app, client, transport,
                                                                  slow):
    rt = app.state.runtime
    w, step = slow
    first = _running(client.loop(step, 10_000, wait=False))
    second = client.loop(step, 5, wait=False)  # the same state: queued behind the first

    closed = client._http.client.delete(f"/v1/sessions/{client._session}")

    assert closed.status_code == 202 and closed.json()["jobs"] == 2, closed.text
    with statehost.connect(URL, token=TOKEN, transport=transport) as other:
        other.job(second.id).cancel()  # never started: it ends at once
        with pytest.raises(JobCancelledError, match=r"after 0 of 5 step\(s\)"):
            other.job(second.id).result()
        assert rt.store.meta(w.id) is not None  # the first job still runs on it
        other.job(first.id).cancel()
        with pytest.raises(JobCancelledError):
            other.job(first.id).result()
    assert rt.store.meta(w.id) is None


def test_client_close_while_a_job_runs_leaves_it_running(app, client, transport, slow):
    rt = app.state.runtime
    w, step = slow
    job = _running(client.loop(step, 20, wait=False))

    client.close()

    with statehost.connect(URL, token=TOKEN, transport=transport) as other:
        again = other.job(job.id)
        assert again.status == "running"
        assert int(again.result()) == 20
    assert rt.store.meta(w.id) is None


def test_a_session_with_a_job_going_does_not_expire_until_the_job_ends(app, client, slow):
    rt, ttl = app.state.runtime, app.state.runtime.settings.session_ttl
    w, step = slow
    job = _running(client.loop(step, 10_000, wait=False))

    rt.expire_sessions(now=time.monotonic() + 2 * ttl)  # idle, but its job runs
    assert rt.store.meta(w.id) is not None
    job.cancel()
    with pytest.raises(JobCancelledError):
        job.result()
    rt.expire_sessions(now=time.monotonic() + ttl / 2)  # its TTL counts from the job's end
    assert rt.store.meta(w.id) is not None
    rt.expire_sessions(now=time.monotonic() + 2 * ttl)
    assert rt.store.meta(w.id) is None


def test_closing_a_session_whose_jobs_ended_frees_it_at_once(app, client):
    rt = app.state.runtime
    w, step = _slow_step(client, delay=0)
    client.loop(step, 2)

    closed = client._http.client.delete(f"/v1/sessions/{client._session}")

    assert closed.status_code == 204 and rt.store.meta(w.id) is None


def test_a_loop_whose_named_states_are_replaced_fails_and_says_why(client, slow):
    w, step = slow
    client.put("team/looped", w)
    job = _running(client.loop(step, 10_000, wait=False))

    client.put("team/looped", statehost.ParamState(jnp.zeros((), jnp.int32)))  # new states

    with pytest.raises(statehost.client.StateNotFoundError, match="were freed while the loop "
                                                                  "ran: their named object was "
                                                                  "deleted .* or replaced"):
        job.result()
    assert job.status == "failed"


def test_jobs_by_status_metric(client):
    client.loop(client.jit(lambda: None), 2)
    assert metric(client, "statehost_jobs", status="completed") >= 1


def test_a_resent_submission_is_the_same_job(client):
    w = statehost.ParamState(jnp.zeros(()))
    step = client.jit(lambda: setattr(w, "value", w.value + 1))
    client.submit(step).result()
    packed = step.placement.packed(step)
    twin = client._stream_twin()
    message = LoopRequest(session=client._session, call_id="ab" * 8, digest=packed.digest,
                          refs=(w.id, twin.state.id), default_stream=twin.state.id,
                          function=packed.section, args=pack(((), {}, None)), steps=2)

    answers = [client._http.frames.post_frame("/v1/jobs", message.to_frame().to_bytes(), 0,
                                              {"content-type": CONTENT_TYPE})
               for _ in range(2)]

    assert [status for status, _ in answers] == [202, 202]
    client.job("ab" * 8).wait()
    client.pull(w)
    assert float(w.value) == 3.0  # 1 + 2 steps, once


@pytest.mark.parametrize("setting", ["on", "progress=False", "STATEHOST_PROGRESS=0",
                                     "not a terminal"])
def test_the_progress_bar_shows_steps_and_can_be_turned_off(client, capsys, monkeypatch,
                                                            setting):
    monkeypatch.delenv("STATEHOST_PROGRESS")
    if setting == "STATEHOST_PROGRESS=0":
        monkeypatch.setenv("STATEHOST_PROGRESS", "0")
    if setting != "not a terminal":  # a bar shows only where a person sees it
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    w = statehost.ParamState(jnp.zeros((), jnp.int32))
    step = client.jit(lambda: setattr(w, "value", w.value + 1))

    client.loop(step, 5, progress=setting != "progress=False")

    err = capsys.readouterr().err
    if setting == "on":
        assert "5/5" in err and "step/s" in err and "job " in err
    else:
        assert err == ""


def test_a_step_whose_program_fails_at_run_time_is_reported_with_its_step(client):
    w = statehost.ParamState(jnp.zeros((), jnp.int32))

    def check(value):
        if value >= 2:
            raise RuntimeError(f"value {value} is too large")

    def step():
        jax.debug.callback(check, w.value)
        w.value = w.value + 1
        return w.value

    with pytest.raises(RemoteExecutionError, match=r"value 2 is too large") as info:
        client.loop(client.jit(step), 5)

    assert info.value.body["completed"] == 2 and "step 3 of 5" in str(info.value)
    assert int(w.value) == 2


def _raw_submit(client, **fields):
    step = client.jit(lambda: None)
    packed = step.placement.packed(step)
    message = LoopRequest(session=client._session, digest=packed.digest,
                          function=packed.section, **{"args": pack(((), {}, None)), "steps": 2,
                                                      **fields})
    status, body = client._http.frames.post_frame(
        "/v1/jobs", message.to_frame().to_bytes(), 0, {"content-type": CONTENT_TYPE})
    return status, json.loads(bytes(body))


# A dict whose keys do not sort: JAX cannot flatten it (found by tests/e2e/test_fuzz.py).
_UNSORTABLE = {1: np.ones(2, np.float32), "a": np.ones(2, np.float32)}


@pytest.mark.parametrize(("args", "kind", "expected"), [
    (((), {"d": _UNSORTABLE}, None), "RemoteExecutionError", r"the function raised "
     r"ValueError: Comparator raised exception while sorting pytree dictionary keys"),
    (((), {}, _UNSORTABLE), "ValidationError", r"over= must be a pytree JAX can take apart; "
     r"flattening it raised ValueError: Comparator"),
], ids=["in-kwargs", "as-over"])
def test_arguments_jax_cannot_flatten_fail_the_job_with_a_4xx(client, args, kind, expected):
    status, job = _raw_submit(client, args=pack(args, refs=False))
    assert status == 202
    with pytest.raises(statehost.client.ClientError) as info:
        client.job(job["id"]).result()
    assert info.value.status < 500 and info.value.body["type"] == kind, info.value.body
    assert re.search(expected, str(info.value)), str(info.value)


@pytest.mark.parametrize(("fields", "expected"), [
    ({"steps": 0}, r"steps=0 must be >= 1"),
    ({"keep": "first"}, r"keep='first' must be one of 'last', 'all'"),
    ({"call_id": "not-hex"}, r"call_id='not-hex' must be 16 to 32 lowercase hex digits"),
    ({"call_id": "ab" * 8 + "\n"}, r"must be 16 to 32 lowercase hex digits"),
    ({"keep_outputs": True}, r"keep_outputs=true is for calls of the stream"),
    ({"returns": "none"}, r"returns='none' must be 'values'"),
])
def test_a_bad_loop_header_is_a_422_before_anything_runs(client, fields, expected):
    status, body = _raw_submit(client, **fields)
    assert status == 422 and body["error"]["type"] == "ValidationError"
    assert re.search(expected, body["error"]["message"]), body
    assert client._http.json("GET", "/v1/jobs") == {"jobs": []}


def test_a_bad_timeout_is_refused_by_the_wire(client):
    status, body = _raw_submit(client, timeout=-1.0)
    assert status == 400
    assert "'timeout' must be a number of seconds above 0 (at most 1e9), or null" in \
        body["error"]["message"]


def test_the_json_routes_show_progress_cancel_and_stream_events(client, slow):
    _, step = slow
    job = _running(client.loop(step, 10_000, wait=False))

    shown = client._http.json("GET", f"/v1/jobs/{job.id}")
    cancelled = client._http.json("POST", f"/v1/jobs/{job.id}/cancel")
    events = client._http.client.get(f"/v1/jobs/{job.id}/events").text  # in process: at the end

    assert shown["status"] == "running" and shown["progress"]["total"] == 10_000
    assert {"done", "total", "steps_per_second", "eta_s", "elapsed_s"} <= set(shown["progress"])
    assert cancelled["cancel_requested"] is True
    assert events.startswith("event: progress\ndata: {") and "\nevent: end\ndata: {" in events
    end = json.loads(events.rsplit("event: end\ndata: ", 1)[1])
    assert end["status"] == "cancelled" and end["error"]["type"] == "JobCancelledError"
    with pytest.raises(JobCancelledError):
        job.result()


def test_a_local_transform_is_shipped_as_a_client_one_would_be(client):
    model = Affine(LANES)

    out = client.loop(pmap(model, **_options()), 3, over=_deltas(3))

    np.testing.assert_allclose(out, 1 + _deltas(3).sum(0), rtol=1e-6)
    np.testing.assert_allclose(model.weight.value, out)


def test_loop_needs_a_transform(client):
    with pytest.raises(TypeError, match=r"statehost.Client.loop: expected a transform \("
                                        r"client.pmap / client.vmap / client.jit\), got function"):
        client.loop(lambda: None, 3)


class _BytesIdPickler(pickle.Pickler):
    """Pickles its object as a state reference whose id is bytes, as a hostile client may."""

    def persistent_id(self, obj):
        return StateRef(b"id", statehost.ParamState, None, None) if obj == "ref" else None


def test_a_job_whose_error_echoes_bytes_still_ends_its_event_stream(client):
    """A job fails on a state reference whose id is bytes; the error names it, and the
    events stream still ends with its 'end' event (encoding the error there used to raise
    and cut the stream short: found by tests/e2e/test_fuzz.py)."""
    file = io.BytesIO()
    _BytesIdPickler(file, protocol=5).dump((("ref",), {}, None))
    status, job = _raw_submit(client, args=Section(file.getvalue()))
    assert status == 202
    events = client._http.client.get(f"/v1/jobs/{job['id']}/events").text
    end = json.loads(events.rsplit("event: end\ndata: ", 1)[1])
    assert end["status"] == "failed" and end["error"]["type"] == "StateNotFoundError"
    assert end["error"]["missing"] == ["b'id'"]
