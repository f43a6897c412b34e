"""Named states end to end: real ``statehost serve`` subprocesses, restarts, crashes."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

import statehost
import statehost.client
from statehost.client import StateConflictError, TransportError
from tests.core.models import PARAM, Affine
from tests.serving import running_server

pytestmark = pytest.mark.long(seconds=165)  # started first: tests/conftest.py

PMAP = dict(axis_name="i", in_axes=0, out_axes=0, state_in_axes={0: PARAM},
            state_out_axes={0: PARAM})
LANES = 8


def _metric(served, name, **labels):
    return served.metric(name, **labels)


def _state_bytes_in(served):
    return _metric(served, "statehost_wire_bytes_total", direction="in", part="state")


def _connect(served):
    return statehost.connect(served.url, token=served.token)


def _writer(label, pid=None):
    """How ``info`` names a writer: its token's label, and the client's host and process."""
    return f"{label} ({socket.gethostname()}, pid {os.getpid() if pid is None else pid})"


def _versions(info):
    return {s["name"]: s["version"] for s in info["states"]}


def _incrementer(counter):
    def incr():
        counter.value = counter.value + 1

    return incr


def _namespace_token(tmp_path, namespace, scope, label):
    """A ``statehost token create`` token, made before the server starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    result = subprocess.run(
        [sys.executable, "-m", "statehost.server", "token", "create", "--namespace", namespace,
         "--scope", scope, "--label", label, "--init", "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )
    return result.stdout.strip().splitlines()[-1]


def test_two_clients_share_a_named_module(tmp_path):
    bob = _namespace_token(tmp_path, "team", "submit", "bob")
    with (running_server(tmp_path) as served, _connect(served) as a,
          statehost.connect(served.url, token=bob) as b):
        model = Affine(LANES)
        a.put("team/net", model)
        before = a.info("team/net")["states"]
        assert [s["status"] for s in before] == ["ok"]

        net = b.get("team/net")
        assert isinstance(net, Affine)
        np.testing.assert_array_equal(net.weight.value, np.ones((LANES, 4)))
        b.pmap(net, **PMAP)(jnp.full((LANES, 4), 2.0))
        np.testing.assert_array_equal(net.weight.value, np.full((LANES, 4), 3.0))

        a.pull(model)
        np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 3.0))
        after = a.info("team/net")["states"]
        assert after[0]["version"] > before[0]["version"]
        assert before[0]["writer"] == _writer("server token")
        assert after[0]["writer"] == _writer("bob")
        assert after[0]["updated_at"] >= before[0]["updated_at"]
        listed = a.list("team")
        assert [o["name"] for o in listed] == ["net"]
        assert listed[0]["states"][0]["writer"] == _writer("bob")


def test_two_kernels_with_one_token_are_told_apart(tmp_path):
    """Every notebook on the box uses the server's token: the writer says which one wrote."""
    with running_server(tmp_path) as served, _connect(served) as here:
        counter = statehost.ShortTermState(jnp.zeros((), jnp.int32))
        here.put("team/counter", counter)
        assert here.info("team/counter")["states"][0]["writer"] == _writer("server token")
        kernel = textwrap.dedent(f"""
            import os
            import statehost
            with statehost.connect({served.url!r}, token={served.token!r}) as client:
                counter = client.get("team/counter")

                def incr():
                    counter.value = counter.value + 1

                client.jit(incr)()
                print(os.getpid())
        """)
        env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
        other = subprocess.run([sys.executable, "-c", kernel], capture_output=True, text=True,
                               env={**env, "JAX_PLATFORMS": "cpu"}, timeout=120)
        assert other.returncode == 0, other.stderr
        pid = int(other.stdout.split()[-1])
        assert pid != os.getpid()
        state = here.info("team/counter")["states"][0]
        assert state["writer"] == _writer("server token", pid)
        here.jit(_incrementer(counter))()
        assert here.info("team/counter")["states"][0]["writer"] == _writer("server token")
    # Persisted with the state: the restarted server still knows who wrote last.
    with running_server(tmp_path) as served, _connect(served) as here:
        assert here.info("team/counter")["states"][0]["writer"] == _writer("server token")


def test_named_states_survive_a_restart_without_reupload(tmp_path):
    with running_server(tmp_path) as served, _connect(served) as client:
        model = Affine(LANES)
        client.put("team/net", model)
        step = client.pmap(model, **PMAP)
        for _ in range(5):
            step(jnp.ones((LANES, 4)))
        np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 6.0))
        info = client.info("team/net")
    # Leaving the block stops the server with SIGTERM (a graceful shutdown).

    with running_server(tmp_path) as served, _connect(served) as client:
        again = client.info("team/net")
        assert _versions(again) == _versions(info)
        assert [s["status"] for s in again["states"]] == ["ok"]
        assert [s["id"] for s in again["states"]] == [s["id"] for s in info["states"]]
        assert again["states"][0]["durable_version"] == again["states"][0]["version"]

        net = client.get("team/net")
        np.testing.assert_array_equal(net.weight.value, np.full((LANES, 4), 6.0))
        client.jit(lambda x: x + 1)(1.0)  # uploads this client's random stream, once
        uploaded = _state_bytes_in(served)
        client.pmap(net, **PMAP)(jnp.ones((LANES, 4)))
        assert _state_bytes_in(served) == uploaded, "the named state was uploaded again"
        np.testing.assert_array_equal(net.weight.value, np.full((LANES, 4), 7.0))
        assert _versions(client.info("team/net"))[info["states"][0]["name"]] == \
            info["states"][0]["version"] + 1


def test_sync_durability_loses_no_acknowledged_commit_on_kill(tmp_path):
    env = {"STATEHOST_DURABILITY": "sync"}
    acknowledged = []
    with running_server(tmp_path, env=env) as served, _connect(served) as client:
        counter = statehost.ShortTermState(jnp.zeros((), jnp.int32))
        client.put("team/counter", counter)
        incr = client.jit(_incrementer(counter))
        started = threading.Event()

        def killer():
            started.wait(30)
            time.sleep(1.0)
            served.process.kill()

        thread = threading.Thread(target=killer)
        thread.start()
        try:
            with pytest.raises(TransportError):  # noqa: PT012
                for i in range(100_000):
                    incr()
                    acknowledged.append(int(counter.value))
                    if i == 2:
                        started.set()
        finally:
            started.set()
            thread.join()
        assert served.process.wait(10) == -signal.SIGKILL
    assert len(acknowledged) > 3
    assert acknowledged == list(range(1, len(acknowledged) + 1))

    with running_server(tmp_path, env=env) as served, _connect(served) as client:
        counter = client.get("team/counter")
        survived = int(counter.value)
        # At most the one call in flight at the kill may have committed unacknowledged.
        assert acknowledged[-1] <= survived <= acknowledged[-1] + 1
        state = client.info("team/counter")["states"][0]
        assert state["status"] == "ok"
        assert state["durable_version"] == state["version"]
        client.jit(_incrementer(counter))()
        assert int(counter.value) == survived + 1


WORKER = textwrap.dedent("""
    import sys
    import statehost

    url, token, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with statehost.connect(url, token=token) as client:
        counter = client.get("team/counter")

        def incr():
            counter.value = counter.value + 1

        step = client.jit(incr)
        for _ in range(calls):
            step()
    print("done", calls)
""")


def test_concurrent_client_processes_lose_no_increment(tmp_path):
    workers, calls = 4, 100
    with running_server(tmp_path) as served, _connect(served) as client:
        counter = statehost.ShortTermState(jnp.zeros((), jnp.int32))
        client.put("team/counter", counter)
        version = client.info("team/counter")["states"][0]["version"]
        procs = [
            subprocess.Popen([sys.executable, "-c", WORKER, served.url, served.token, str(calls)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for _ in range(workers)
        ]
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        for p, out in zip(procs, outputs, strict=True):
            assert p.returncode == 0, out
        client.pull(counter)
        assert int(counter.value) == workers * calls
        state = client.info("team/counter")["states"][0]
        assert state["version"] == version + workers * calls


def test_a_stale_write_conflicts_and_retries_land(tmp_path):
    with running_server(tmp_path) as served, _connect(served) as a, _connect(served) as b:
        a.put("team/counter", statehost.ShortTermState(jnp.zeros((), jnp.int32)))
        mine = a.get("team/counter")
        theirs = b.get("team/counter")
        a.jit(_incrementer(mine))()
        assert int(mine.value) == 1

        theirs.value = theirs.value + 10  # based on the stale value 0
        bump = b.jit(_incrementer(theirs))
        with pytest.raises(StateConflictError) as info:
            bump()
        assert info.value.status == 409
        assert [c["id"] for c in info.value.conflicts] == [theirs.id]
        a.pull(mine)
        assert int(mine.value) == 1, "the conflicting upload was committed"

        theirs.value = jnp.asarray(10, jnp.int32)  # stale again
        b.jit(_incrementer(theirs), retries=1)()
        assert int(theirs.value) == 2  # pulled A's 1, dropped the local 10, then + 1
        a.pull(mine)
        assert int(mine.value) == 2


def test_a_damaged_file_is_reported_and_the_rest_loads(tmp_path):
    with running_server(tmp_path) as served, _connect(served) as client:
        client.put("team/good", Affine(LANES))
        client.put("team/bad", statehost.ShortTermState(jnp.arange(5.0)))
        bad = client.info("team/bad")["states"][0]
    path = tmp_path / "data" / "states" / "team" / f"{bad['id']}.safetensors"
    assert path.is_file()
    path.write_bytes(b"this is not a safetensors file at all" * 4)

    with running_server(tmp_path) as served, _connect(served) as client:
        damaged = client.info("team/bad")["states"][0]
        assert damaged["status"] == "damaged"
        assert "damaged" in damaged["problem"] and str(path) in damaged["problem"]
        lines = [line for line in served.output().splitlines()
                 if "damaged" in line and bad["id"] in line]
        assert lines, served.output()
        assert "team/bad" in lines[0]

        good = client.get("team/good")
        assert client.info("team/good")["states"][0]["status"] == "ok"
        np.testing.assert_array_equal(good.weight.value, np.ones((LANES, 4)))
        client.jit(good)(jnp.ones((LANES, 4)))
        np.testing.assert_array_equal(good.weight.value, np.full((LANES, 4), 2.0))
        with pytest.raises(statehost.client.NotFoundError):
            client.get("team/missing")


def test_a_module_never_called_before_a_restart_can_be_pmapped_after(tmp_path):
    with running_server(tmp_path) as served, _connect(served) as client:
        client.put("team/net", Affine(LANES))  # uploaded, never used by a call

    with running_server(tmp_path) as served, _connect(served) as client:
        net = client.get("team/net")
        client.pmap(net, **PMAP)(jnp.ones((LANES, 4)))
        np.testing.assert_array_equal(net.weight.value, np.full((LANES, 4), 2.0))
