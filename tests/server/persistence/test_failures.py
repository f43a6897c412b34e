"""Failing flushes are visible (health, metric) and bound the unflushed backlog (StorageError)."""

import shutil
import time

import httpx
import jax.numpy as jnp
import pytest

import statehost
from statehost.server import Settings, create_app
from statehost.server.persistence import StateRecord, StorageError
from statehost.server.testing import InProcessTransport
from tests.serving import metric_value

TOKEN = "t"
LIMIT = 3


@pytest.fixture
def served(tmp_path):
    app = create_app(Settings(tokens=(TOKEN,), data_dir=tmp_path / "data", flush_interval=0.05,
                              max_unflushed_commits=LIMIT))
    transport = InProcessTransport(app)
    yield app.state.runtime, transport
    transport.shutdown()


def _eventually(predicate, within=5.0):
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"not true within {within} s"
        time.sleep(0.02)


def _increment(counter):
    def incr():
        counter.value = counter.value + 1

    return incr


def test_failing_flushes_degrade_health_and_bound_the_backlog(served, tmp_path):
    rt, transport = served
    http = httpx.Client(transport=transport, base_url="http://x",
                        headers={"authorization": f"Bearer {TOKEN}"})
    with statehost.connect("http://x", token=TOKEN, transport=transport, dispatch="sync") as client:
        counter = statehost.ShortTermState(jnp.zeros((), jnp.int32))
        client.put("team/c", counter)
        file = tmp_path / "data" / "states" / "team" / f"{counter.id}.safetensors"
        _eventually(file.exists)
        assert http.get("/v1/health").json() == {"status": "ok"}

        # The state file's path becomes a folder: every write of it fails (even as root).
        file.unlink()
        (file / "blocker").mkdir(parents=True)
        incr = client.jit(_increment(counter))
        incr()
        _eventually(lambda: http.get("/v1/health").json()["status"] == "degraded")
        health = http.get("/v1/health")
        assert health.status_code == 200
        reason = health.json()["reason"]
        assert "Is a directory" in reason and str(tmp_path) not in reason and "team" not in reason
        assert metric_value(http.get("/metrics").text, "statehost_flush_failures_total") >= 1

        rt.persistence.check_backlog("team")  # 1 commit behind: still accepted
        for _ in range(LIMIT):
            incr()
        with pytest.raises(StorageError, match=r"the call was not applied: namespace 'team' "
                           r"has a state 4 commit\(s\) ahead .* fails \(Is a directory\)") as info:
            rt.persistence.check_backlog("team")
        assert str(tmp_path) not in str(info.value)
        assert (StorageError.status, StorageError.type) == (503, "StorageError")
        rt.persistence.check_backlog("other")  # other namespaces are not refused

        shutil.rmtree(file)  # the disk is fixed: the next flush writes, health recovers
        _eventually(lambda: http.get("/v1/health").json() == {"status": "ok"})
        rt.persistence.check_backlog("team")
        assert client.info("team/c")["states"][0]["durable_version"] == 5


def test_a_failed_write_raises_a_storage_error_without_paths(served, tmp_path):
    rt, transport = served
    with statehost.connect("http://x", token=TOKEN, transport=transport, dispatch="sync") as client:
        counter = statehost.ShortTermState(jnp.zeros((), jnp.int32))
        client.put("team/c", counter)
        file = tmp_path / "data" / "states" / "team" / f"{counter.id}.safetensors"
        _eventually(file.exists)
    file.unlink()
    file.mkdir()
    meta = rt.store.meta(counter.id)
    record = StateRecord(counter.id, jnp.ones((), jnp.int32), meta.version + 1, "me", time.time())
    with pytest.raises(StorageError, match=r"the call was not applied: the server could not "
                       r"write 1 named state\(s\) of namespace\(s\) team to its disk "
                       r"\(Is a directory\)") as info:
        rt.persistence.write([record])
    assert str(tmp_path) not in str(info.value)
    assert rt.store.meta(counter.id).durable == meta.version  # not recorded as written
