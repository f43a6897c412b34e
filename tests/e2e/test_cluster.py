"""A server spanning a ``jax.distributed`` group: 2 real processes x 4 CPU devices (issue 14).

One group (module-scoped) serves the seed example, the sharding, the repeat calls, the
named objects, loops and jobs, and the bad input. A second one puts a named state, is
restarted on the same data dirs, reloads and flushes it, and finally loses a follower to
SIGKILL while a call runs in it; a third loses one while a loop runs.
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
import statehost.client
from statehost.wire import CONTENT_TYPE
from tests.cluster import health, running_group
from tests.core.models import PARAM, Affine
from tests.examples.test_parallelisation_example import (
    REPO_ROOT,
    SAMPLE_SHARED,
    _lines,
    _numbers,
    _section,
    run_example,
)

pytestmark = pytest.mark.long(seconds=120)  # started first: tests/conftest.py

PMAP = dict(axis_name="i", in_axes=0, out_axes=0, state_in_axes={0: PARAM},
            state_out_axes={0: PARAM})
# A printed jax.Array's numbers (as tests/examples/test_parallelisation_remote_example.py).
_ARRAY = re.compile(r"^Array\((\[.*?\]),\s+dtype=[^)]*\)$", re.MULTILINE | re.DOTALL)
LEADER_DEVICES = [0, 1, 2, 3]
FOLLOWER_DEVICES = [2048, 2049, 2050, 2051]  # CPU device ids of process 1 (jax 0.10.2)


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    with running_group(tmp_path_factory.mktemp("group")) as running:
        yield running


@pytest.fixture
def client(group):
    with statehost.connect(group.leader.url, token=group.leader.token) as connected:
        yield connected


def _follower(group, timeout=60.0):
    """The follower's health JSON once it has applied every operation the leader sent (it
    runs them a little behind the leader's replies)."""
    deadline = time.monotonic() + timeout
    while True:
        sent = health(group.leader)[1]["ops"]
        body = health(group.followers[0])[1]
        if body["ops"] >= sent and not body["applying"]:
            return body
        assert time.monotonic() < deadline, (sent, body)
        time.sleep(0.02)


def test_the_remote_seed_example_prints_the_seeds_values_with_8_lanes(group):
    out = run_example(REPO_ROOT / "examples" / "parallelisation_remote.py",
                      {"STATEHOST_URL": group.leader.url, "STATEHOST_TOKEN": group.leader.token})

    assert _lines(out)[1] == "server device count: 8"
    np.testing.assert_array_equal(_numbers(_section(out, "final weights:",
                                                    "weights after pairwise update:")),
                                  np.arange(1.0, 33.0))
    np.testing.assert_array_equal(
        _numbers(_section(out, "weights after pairwise update:", "Array(")),
        [2.0] * 4 + [0.0] * 4)
    assert "Array([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5], dtype=float32)" in out
    arrays = [_numbers(body) for body in _ARRAY.findall(out)]
    assert len(arrays) == 4, out  # add_with_scale, normal, shared, the final weights
    np.testing.assert_allclose(arrays[2], SAMPLE_SHARED, rtol=0, atol=1e-5)
    assert out[out.rindex("Array("):].count("[2., 2., 2., 2.]") == 8
    assert _follower(group)["failed"] == 0  # the follower ran every operation too


def test_info_and_devices_show_every_process(group, client):
    devices = client.devices()
    assert [d.id for d in devices] == LEADER_DEVICES + FOLLOWER_DEVICES
    assert [d.process_index for d in devices] == [0] * 4 + [1] * 4
    info = httpx.get(group.leader.url + "/v1/info",
                     headers={"authorization": f"Bearer {group.leader.token}"}).json()
    processes = info["processes"]
    assert [(p["index"], p["role"], p["devices"], p["health"]) for p in processes] == [
        (0, "leader", LEADER_DEVICES, "ok"), (1, "follower", FOLLOWER_DEVICES, "ok")]
    assert 0 <= processes[1]["heartbeat_age_s"] < 2.0
    assert info["limits"]["workers"] == 1  # one total order of device work
    assert [group.leader.metric("statehost_group_process_up", process=i) for i in "01"] == \
        [1.0, 1.0]


def test_a_state_is_sharded_across_both_processes(group, client):
    model = Affine(8)
    client.pmap(model, **PMAP)(jnp.ones((8, 4)))
    state_id = model.weight.id

    assert _follower(group)["states"][state_id] == {"shards": [FOLLOWER_DEVICES]}
    assert health(group.leader)[1]["states"][state_id] == {"shards": [LEADER_DEVICES]}
    np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 2.0))


def test_repeat_calls_move_no_state_bytes_and_compile_nothing(group, client):
    model = Affine(8)
    step = client.pmap(model, pull=False, **PMAP)
    step(jnp.ones((8, 4)))
    leader = group.leader
    moved = [leader.metric("statehost_wire_bytes_total", direction=d, part="state")
             for d in ("in", "out")]
    compiles = leader.metric("statehost_compiles_total")
    ops = _follower(group)["ops"]
    cast = leader.metric("statehost_cluster_broadcast_bytes_total", process="1")
    for _ in range(10):
        out = step(jnp.ones((8, 4)))
    np.testing.assert_array_equal(np.asarray(out), np.full((8, 4), 12.0))  # all 10 ran

    # the requests went to the follower (a few KiB each: no state's bytes come with them)
    sent = leader.metric("statehost_cluster_broadcast_bytes_total", process="1") - cast
    assert 10 * 128 < sent < 10 * 16384

    assert [leader.metric("statehost_wire_bytes_total", direction=d, part="state")
            for d in ("in", "out")] == moved
    assert leader.metric("statehost_compiles_total") == compiles
    follower = _follower(group)
    assert follower["ops"] >= ops + 11  # 10 calls and the fetch, on both processes
    # the calls' outputs kept for the client, alike (the client frees them in batches)
    assert follower["kept_arrays"] == health(group.leader)[1]["kept_arrays"] > 0
    client.pull(model)
    np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 12.0))
    for _ in range(70):  # their outputs are dropped: the client frees them (64 at a time)
        step(jnp.ones((8, 4)))
    client.pull(model)
    follower = _follower(group)
    assert follower["kept_arrays"] == health(group.leader)[1]["kept_arrays"] < 70


def _doctor(served, capsys) -> tuple[int, str]:
    from statehost._cli import main

    code = main(["doctor", "--url", served.url, "--token", served.token])
    return code, capsys.readouterr().out


def _process_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["PROCESS"])
    rows = {}
    for line in lines[start + 1:]:
        cells = line.split()
        if not cells or not cells[0].isdigit():
            break
        rows[cells[0]] = cells
    return rows


def test_doctor_shows_every_process_of_the_group(group, capsys):
    code, out = _doctor(group.leader, capsys)
    assert code == 0, out
    assert "devices: 8:" in out and "processes: 2 (a jax.distributed group" in out
    rows = _process_rows(out)
    assert rows["0"][1] == "leader" and rows["1"][1] == "follower"
    assert " ".join(rows["0"]).count("ok") == 1 and "ok" in rows["1"]
    assert "2048, 2049, 2050, 2051" in out  # the follower's devices
    assert "all good" in out


def test_put_and_get_from_two_clients(group, client):
    model = Affine(8)
    client.pmap(model, **PMAP)(jnp.ones((8, 4)))
    client.put("team/net", model)
    with statehost.connect(group.leader.url, token=group.leader.token) as other:
        net = other.get("team/net")
        np.testing.assert_array_equal(net.weight.value, np.full((8, 4), 2.0))
        other.pmap(net, **PMAP)(jnp.full((8, 4), 3.0))
    client.pull(model)
    np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 5.0))
    assert model.weight.id in _follower(group)["states"]
    client.delete("team/net")  # on the follower too
    assert model.weight.id not in _follower(group)["states"]


def _loop_ops(before, after):
    """How many of a loop's operations (its start, steps and end) the follower applied."""
    return {kind: after["kinds"].get(kind, 0) - before["kinds"].get(kind, 0)
            for kind in ("loop", "step", "loop_end")}


def _wait_for_steps(group, count, timeout=60.0):
    """Until the follower has applied ``count`` loop steps since it started."""
    deadline = time.monotonic() + timeout
    while health(group.followers[0])[1]["kinds"].get("step", 0) < count:
        assert time.monotonic() < deadline, health(group.followers[0])
        time.sleep(0.02)


def test_a_loop_gives_the_states_its_steps_as_calls_give_on_both_processes(group, client):
    looped, called = Affine(8), Affine(8)
    batches = np.arange(3 * 8 * 4, dtype=np.float32).reshape(3, 8, 4)
    before = _follower(group)

    out = client.loop(client.pmap(looped, **PMAP), 3, over=batches, keep="all",
                      progress=False)

    step = client.pmap(called, **PMAP)
    expected = np.stack([np.asarray(step(batch)) for batch in batches])
    np.testing.assert_array_equal(np.asarray(out), expected)
    # lanes 4..7 are the follower's shards (the leader gathers them): it ran every step
    np.testing.assert_array_equal(looped.weight.value, called.weight.value)
    np.testing.assert_array_equal(looped.weight.value, 1.0 + batches.sum(axis=0))
    after = _follower(group)
    assert after["failed"] == before["failed"]
    assert _loop_ops(before, after) == {"loop": 1, "step": 3, "loop_end": 1}
    assert after["loops"] == 0
    assert after["states"][looped.weight.id] == {"shards": [FOLLOWER_DEVICES]}


def test_a_loop_cancelled_partway_leaves_as_many_steps_on_both_processes(group, client):
    weight = statehost.ParamState(jnp.zeros((8, 4)))

    def step(delta):
        weight.value = weight.value + delta
        return weight.value

    before = _follower(group)
    job = client.loop(client.pmap(step, **PMAP), 1_000_000, jnp.ones((8, 4)), wait=False)
    _wait_for_steps(group, before["kinds"].get("step", 0) + 3)
    job.cancel()
    with pytest.raises(statehost.client.JobCancelledError, match="was cancelled after") \
            as stopped:
        job.result(timeout=30)

    done = stopped.value.body["completed"]
    assert 3 <= done < 1_000_000
    after = _follower(group)
    assert after["failed"] == before["failed"] and after["loops"] == 0
    assert _loop_ops(before, after) == {"loop": 1, "step": done, "loop_end": 1}
    # pulled after the stop: the leader's lanes and the follower's, each `done` steps on
    np.testing.assert_array_equal(weight.value, np.full((8, 4), float(done)))


def test_a_loop_whose_step_fails_fails_alike_and_ends_on_both_processes(group, client):
    weight = statehost.ParamState(jnp.zeros((8, 4)))

    def step(delta):
        weight.value = weight.value + delta
        raise ValueError("this step is broken")

    before = _follower(group)
    with pytest.raises(statehost.client.RemoteExecutionError, match="this step is broken"):
        client.loop(client.pmap(step, **PMAP), 3, jnp.ones((8, 4)), progress=False)

    after = _follower(group)
    assert after["failed"] == before["failed"] + 1 and after["loops"] == 0
    assert _loop_ops(before, after) == {"loop": 1, "step": 1, "loop_end": 1}
    client.pull(weight)
    np.testing.assert_array_equal(weight.value, np.zeros((8, 4)))


def test_a_job_completes_in_a_group_and_another_client_reads_its_result(group, client):
    model = Affine(8)
    job = client.loop(client.pmap(model, **PMAP), 5, jnp.ones((8, 4)), wait=False)

    out = job.result()

    assert (job.status, job.progress) == ("completed", (5, 5))
    np.testing.assert_array_equal(np.asarray(out), np.full((8, 4), 6.0))
    np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 6.0))
    with statehost.connect(group.leader.url, token=group.leader.token) as other:
        np.testing.assert_array_equal(np.asarray(other.job(job.id).result()),
                                      np.full((8, 4), 6.0))
    follower = _follower(group)
    assert follower["loops"] == 0
    assert follower["states"][model.weight.id] == {"shards": [FOLLOWER_DEVICES]}


def test_the_json_value_api_reads_and_writes_on_every_process(group, client):
    model = Affine(8)
    client.put("team/counter", model)
    url = f"{group.leader.url}/v1/namespaces/team/states/counter.weight/value"
    auth = {"authorization": f"Bearer {group.leader.token}"}
    before = _follower(group)

    read = httpx.get(url, headers=auth)
    written = httpx.put(url, json={"data": [[7.0] * 4] * 8}, headers=auth)
    stale = httpx.put(url, json={"data": [[8.0] * 4] * 8},
                      headers={**auth, "if-match": read.headers["etag"]})
    again = httpx.get(url, headers=auth)

    assert (read.status_code, written.status_code, stale.status_code, again.status_code) == \
        (200, 200, 412, 200), (read.text, written.text)
    assert read.json()["data"] == [[1.0] * 4] * 8
    assert again.json()["data"] == [[7.0] * 4] * 8
    assert again.json()["version"] == written.json()["version"] == read.json()["version"] + 1
    # the read, the write and the read (the stale write is not sent); the fixture's other
    # sessions may close meanwhile (one op each)
    after = _follower(group)
    assert after["failed"] == before["failed"] and after["ops"] >= before["ops"] + 3
    assert after["states"][model.weight.id] == {"shards": [FOLLOWER_DEVICES]}
    client.pmap(model, **PMAP)(jnp.ones((8, 4)))  # the new value, laid out on both
    np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 8.0))


def test_a_registered_function_is_invoked_with_json_on_every_process(group, client):
    model = Affine(8)
    client.put("fns/net", model)
    client.register("fns/step", client.pmap(model, **PMAP))
    before = _follower(group)
    url = f"{group.leader.url}/v1/namespaces/fns/functions/step/invoke"
    auth = {"authorization": f"Bearer {group.leader.token}"}

    answers = [httpx.post(url, json={"args": [[[2.0] * 4] * 8]}, headers=auth)
               for _ in range(2)]

    assert [a.status_code for a in answers] == [200, 200], answers[0].text
    assert answers[1].json()["versions"]["net.weight"] == \
        answers[0].json()["versions"]["net.weight"] + 1
    after = _follower(group)
    assert after["failed"] == before["failed"] and after["ops"] >= before["ops"] + 2
    assert after["states"][model.weight.id] == {"shards": [FOLLOWER_DEVICES]}
    net = client.get("fns/net")
    np.testing.assert_array_equal(net.weight.value, np.full((8, 4), 5.0))
    client.delete("fns/net")


def test_a_durability_change_reaches_every_process_between_the_same_commits(group, client):
    auth = {"authorization": f"Bearer {group.leader.token}"}
    before = _follower(group)
    answer = httpx.put(f"{group.leader.url}/v1/namespaces/durable", json={
        "durability": "sync"}, headers=auth)
    assert answer.status_code == 200, answer.text
    assert answer.json()["durability"] == "sync"
    # Commits gather for sync on every process: a follower that had not switched would
    # send no shards, and these would fail.
    model = Affine(8)
    client.pmap(model, **PMAP)(jnp.ones((8, 4)))
    client.put("durable/net", model)
    client.pmap(model, **PMAP)(jnp.ones((8, 4)))
    client.loop(client.pmap(model, **PMAP), 2, jnp.ones((8, 4)), progress=False)  # each step
    row = httpx.get(f"{group.leader.url}/v1/namespaces/durable/states/net.weight",
                    headers=auth).json()
    assert row["durable_version"] == row["version"] >= 4  # on disk at each commit
    np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 5.0))
    after = _follower(group)
    assert after["failed"] == before["failed"]
    # the switch, the call, the put, the call, the loop (its start, 2 steps, its end)
    assert after["ops"] >= before["ops"] + 8
    back = httpx.put(f"{group.leader.url}/v1/namespaces/durable", json={
        "durability": "interval"}, headers=auth)
    assert back.status_code == 200, back.text
    client.delete("durable/net")


def test_a_pmap_on_some_devices_keeps_its_states_there(group, client):
    model = Affine(2)
    leader_pair = client.devices()[:2]
    client.pmap(model, devices=leader_pair, **PMAP)(jnp.ones((2, 4)))
    np.testing.assert_array_equal(model.weight.value, np.full((2, 4), 2.0))
    ops = _follower(group)
    with pytest.raises(statehost.client.RemoteExecutionError, match="cannot move to the devices"):
        client.pmap(model, devices=client.devices()[2:4], **PMAP)(jnp.ones((2, 4)))

    other = Affine(2)
    with pytest.raises(statehost.client.ServerError, match="cannot read it"):
        client.pmap(other, devices=client.devices()[4:6], **PMAP)(jnp.ones((2, 4)))
    after = _follower(group)
    assert after["failed"] == ops["failed"] + 2  # failed alike on both: nothing diverged
    client.pull(model)
    np.testing.assert_array_equal(model.weight.value, np.full((2, 4), 2.0))


def test_bad_input_never_reaches_a_follower(group, client):
    model = Affine(8)
    client.pmap(model, **PMAP)(jnp.ones((8, 4)))
    before = _follower(group)
    url, auth = group.leader.url, {"authorization": f"Bearer {group.leader.token}"}

    garbage = httpx.post(url + "/v1/call", content=b"not a frame",
                         headers={**auth, "content-type": CONTENT_TYPE})
    closed = httpx.delete(url + "/v1/sessions/" + "0" * 32, headers=auth)
    no_token = httpx.post(url + "/v1/call", content=b"x")

    assert (garbage.status_code, closed.status_code, no_token.status_code) == (400, 404, 401)
    after = _follower(group)
    # an interval flush of an earlier test's named state may run meanwhile; nothing else may
    flushes = after["kinds"].get("flush", 0) - before["kinds"].get("flush", 0)
    assert after["ops"] - flushes == before["ops"]
    assert {**after["kinds"], "flush": 0} == {**before["kinds"], "flush": 0}
    assert health(group.leader)[0] == 200
    client.pull(model)  # and the states are as they were
    np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 2.0))


def test_followers_serve_only_health(group):
    answer = httpx.get(group.followers[0].url + "/v1/info")

    assert answer.status_code == 404
    assert "serves only GET /v1/health" in answer.json()["error"]["message"]
    status, body = health(group.followers[0])
    assert (status, body["role"], body["process_index"], body["leader"]) == \
        (200, "follower", 1, "following")
    assert body["devices"] == FOLLOWER_DEVICES


# -- restarting the group, then losing a follower (a group of its own) --------------------
@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """A group that put a named state (durability sync) and was restarted on the same data
    dirs; it flushes every 0.2 s."""
    tmp = tmp_path_factory.mktemp("restart")
    model = Affine(8)
    with running_group(tmp, env={"STATEHOST_DURABILITY": "sync"}) as group, \
            statehost.connect(group.leader.url, token=group.leader.token) as client:
        client.pmap(model, **PMAP)(jnp.ones((8, 4)))
        client.put("team/net", model)  # sync: on disk when it returns
    with running_group(tmp, env={"STATEHOST_FLUSH_INTERVAL": "0.2"}) as group:
        yield tmp, group, model.weight.id


def test_named_states_survive_a_restart_of_the_whole_group(restarted):
    from statehost.server.persistence.database import Database
    from statehost.server.persistence.files import load_value

    tmp, group, state_id = restarted
    with statehost.connect(group.leader.url, token=group.leader.token) as client:
        net = client.get("team/net")
        np.testing.assert_array_equal(net.weight.value, np.full((8, 4), 2.0))
        assert net.weight.id == state_id
        assert _follower(group)["states"][state_id] == {"shards": [FOLLOWER_DEVICES]}
        client.pmap(net, **PMAP)(jnp.ones((8, 4)))  # written by the next flush (interval)

    db = Database(tmp / "data-0" / "statehost.db")
    try:
        path = tmp / "data-0" / db.state(state_id).file
    finally:
        db.close()
    deadline = time.monotonic() + 60
    while jax.tree_util.tree_leaves(load_value(path)[0])[0][0, 0] != 3.0:
        assert time.monotonic() < deadline, "the flush did not write the new value"
        time.sleep(0.05)


def test_a_data_dir_of_another_process_count_is_refused(restarted):
    tmp, _, _ = restarted
    alone = subprocess.run(
        [sys.executable, "-m", "statehost.server", "serve", "--data-dir", str(tmp / "data-0"),
         "--port", "0"], capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")})

    assert alone.returncode == 2
    assert "holds the named states of a group of 2 process(es)" in alone.stderr
    assert "client.put('ns/name', obj)" in alone.stderr


# -- losing a follower -------------------------------------------------------------------
def test_a_killed_follower_fails_the_running_call_and_refuses_new_ones(restarted, tmp_path,
                                                                       capsys):
    _, group, _ = restarted  # the last test of this group
    flag = tmp_path / "go"

    def waits(delta):  # traced by both processes; the test lets it go
        while not flag.exists():
            time.sleep(0.01)
        return delta + jax.lax.psum(delta, "i")

    with statehost.connect(group.leader.url, token=group.leader.token) as client:
        answers = []

        def call():
            try:
                answers.append(client.pmap(waits, axis_name="i")(np.ones((8, 2), np.float32)))
            except Exception as exc:
                answers.append(exc)

        runner = threading.Thread(target=call)
        runner.start()
        deadline = time.monotonic() + 60
        while health(group.followers[0])[1]["applying"].get("kind") != "call":  # inside it
            assert time.monotonic() < deadline, health(group.followers[0])
            time.sleep(0.02)
        os.kill(group.followers[0].process.pid, signal.SIGKILL)
        runner.join(timeout=30)
        flag.touch()

        assert not runner.is_alive()
        assert isinstance(answers[0], statehost.client.ClusterUnavailableError), answers
        assert answers[0].processes == [1]
        assert "restart the whole group" in str(answers[0])
        status, body = health(group.leader)
        assert status == 503 and body["status"] == "unhealthy"
        assert "process 1 lost" in body["reason"]
        assert group.leader.metric("statehost_group_process_up", process="1") == 0.0
        with pytest.raises(statehost.client.ClusterUnavailableError, match="process 1"):
            client.pmap(lambda x: x * 2, axis_name="i")(np.ones((8, 2), np.float32))
    code, out = _doctor(group.leader, capsys)
    assert code == 1, out
    assert any(cell.startswith("lost") for cell in _process_rows(out)["1"])
    assert "PROBLEM  process(es) 1 of the server's group are not answering" in out


# -- durability sync: nothing acknowledged is lost; a follower lost mid-loop ------------------
def _state_row(group, name):
    answer = httpx.get(f"{group.leader.url}/v1/namespaces/team/states/{name}",
                       headers={"authorization": f"Bearer {group.leader.token}"})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_follower_lost_mid_loop_fails_its_job_and_a_sync_put_acked_before_survives(
        tmp_path):
    model = Affine(8)
    with running_group(tmp_path, env={"STATEHOST_DURABILITY": "sync"}) as group, \
            statehost.connect(group.leader.url, token=group.leader.token) as client:
        client.pmap(model, **PMAP)(jnp.full((8, 4), 3.0))
        client.put("team/acked", model)  # acknowledged: on disk by now (sync)
        client.pmap(model, **PMAP)(jnp.ones((8, 4)))  # the named state's next version
        acked = _state_row(group, "acked.weight")
        assert acked["durable_version"] == acked["version"]
        # a job running when the follower dies (on a state of its own: not named)
        job = client.loop(client.pmap(Affine(8), **PMAP), 1_000_000, jnp.ones((8, 4)),
                          wait=False)
        _wait_for_steps(group, 3)
        os.kill(group.followers[0].process.pid, signal.SIGKILL)
        with pytest.raises(statehost.client.ClusterUnavailableError,
                           match="process 1 of this server.s group of 2 is lost") as lost:
            job.result(timeout=30)  # at once, not after the million steps
        assert lost.value.processes == [1]
        assert job.status == "failed" and job.progress[0] < 1_000_000
        deadline = time.monotonic() + 30
        while health(group.leader)[0] != 503:
            assert time.monotonic() < deadline, "the leader did not notice the loss"
            time.sleep(0.05)
        with pytest.raises(statehost.client.ClusterUnavailableError,
                           match="process 1 of this server.s group of 2 is lost"):
            np.asarray(client.pmap(model, **PMAP)(jnp.ones((8, 4))))  # synchronises
        refused = httpx.post(f"{group.leader.url}/v1/sessions",
                             headers={"authorization": f"Bearer {group.leader.token}"})
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["type"] == "ClusterUnavailableError"

    with running_group(tmp_path) as group, \
            statehost.connect(group.leader.url, token=group.leader.token) as client:
        back = _state_row(group, "acked.weight")
        assert (back["version"], back["durable_version"], back["id"]) == \
            (acked["version"], acked["version"], model.weight.id)
        net = client.get("team/acked")
        np.testing.assert_array_equal(net.weight.value, np.full((8, 4), 5.0))
        assert _follower(group)["states"][model.weight.id] == {"shards": [FOLLOWER_DEVICES]}
