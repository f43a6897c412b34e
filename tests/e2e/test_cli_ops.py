"""``statehost ls``, ``doctor``, ``checkpoint`` and a graceful SIGTERM, against real servers."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from tests.serving import free_port, running_server

INTERVAL = {"STATEHOST_DURABILITY": "interval", "STATEHOST_FLUSH_INTERVAL": "3600"}


def _cli(tmp_path, *args, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    env.update({"XDG_CONFIG_HOME": str(tmp_path / "cli-xdg"), "JAX_PLATFORMS": "cpu"})
    return subprocess.run([sys.executable, "-m", "statehost.server", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _incrementer(counter):
    def incr():
        counter.value = counter.value + 1

    return incr


def _state(client, name):
    return client.info(name)["states"][0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("ops"), env=INTERVAL) as served:
        yield served


# -- ls ---------------------------------------------------------------------------
def test_ls_shows_a_put_object_with_version_and_bytes(served, tmp_path):
    with statehost.connect(served.url, token=served.token) as client:
        counter = statehost.ShortTermState(jnp.zeros((3,), jnp.int32))
        client.put("lsns/counter", counter)
        client.jit(_incrementer(counter))()
        state = _state(client, "lsns/counter")
    result = _cli(tmp_path, "ls", served.url, "--token", served.token)
    assert result.returncode == 0, result.stderr
    assert "lsns  (durability interval, 1 object(s), 12 B resident)" in result.stdout
    rows = [line.split() for line in result.stdout.splitlines() if "counter" in line]
    assert len(rows) == 1, result.stdout
    row = rows[0]
    assert row[:3] == ["counter", "counter", "statehost.ShortTermState"]
    assert "int32[3]" in row and "12" in row and "B" in row
    assert str(state["version"]) in row
    assert row[-1] == "ok"


def test_ls_with_a_wrong_token_fails_in_one_line(served, tmp_path):
    result = _cli(tmp_path, "ls", served.url, "--token", "wrong")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "statehost ls: " in result.stderr and "not accepted" in result.stderr


# -- doctor -----------------------------------------------------------------------
def test_doctor_against_a_matching_server(served, tmp_path):
    result = _cli(tmp_path, "doctor", served.url, "--token", served.token)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in ("python", "jax", "cloudpickle", "protocol", "statehost"):
        line = next(x for x in out.splitlines()[1:] if x.split()[:1] == [name])
        assert line.rstrip().endswith("OK"), line
    assert "MISMATCH" not in out
    assert "devices: 8: 8 x cpu:cpu (ids 0, 1, 2, 3, 4, 5, 6, 7)" in out
    assert "max_body 4.0 GiB" in out and "session_ttl 3600" in out
    assert "all good" in out


def test_doctor_reports_a_version_mismatch(served, monkeypatch, capsys):
    import statehost.wire
    from statehost.server.cli import main

    real = statehost._wire.local_versions()
    monkeypatch.setattr(statehost._wire, "local_versions", lambda: {**real, "jax": "0.1.0"})
    assert main(["doctor", served.url, "--token", served.token]) == 1
    out = capsys.readouterr().out
    jax_line = next(x for x in out.splitlines()[1:] if x.split()[:1] == ["jax"])
    assert jax_line.split()[1:] == ["0.1.0", real["jax"], "MISMATCH"]
    assert "REFUSED" in out and f"jax: client has 0.1.0, server has {real['jax']}" in out


def test_doctor_with_a_wrong_token(served, tmp_path):
    result = _cli(tmp_path, "doctor", served.url, "--token", "not-a-token")
    assert result.returncode == 1
    assert "the token is not accepted by this server" in result.stdout
    assert "statehost token create" in result.stdout


def test_doctor_without_a_token_says_how_to_get_one(served, tmp_path):
    result = _cli(tmp_path, "doctor", served.url)
    assert result.returncode == 1
    assert "no token was sent" in result.stdout and "--token" in result.stdout


def test_doctor_against_a_closed_port(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = _cli(tmp_path, "doctor", url, "--token", "x", "--timeout", "5")
    assert result.returncode == 1
    assert f"cannot connect to {url}" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


# -- checkpoint -------------------------------------------------------------------
def test_checkpoint_flushes_a_changed_state(served, tmp_path):
    with statehost.connect(served.url, token=served.token) as client:
        counter = statehost.ShortTermState(jnp.zeros((), jnp.int32))
        client.put("ckpt/c", counter)
        client.jit(_incrementer(counter))()
        before = _state(client, "ckpt/c")
        assert before["durable_version"] < before["version"]  # flush interval is an hour

        result = _cli(tmp_path, "checkpoint", served.url, "ckpt/c", "--token", served.token)
        assert result.returncode == 0, result.stderr
        assert "ckpt/c: flushed 1 state(s)" in result.stdout
        after = _state(client, "ckpt/c")
        assert after["durable_version"] == after["version"] == before["version"]

        client.jit(_incrementer(counter))()
        result = _cli(tmp_path, "checkpoint", served.url, "--token", served.token)
        assert result.returncode == 0, result.stderr
        assert "ckpt: flushed 1 state(s)" in result.stdout
        after = _state(client, "ckpt/c")
        assert after["durable_version"] == after["version"]


def test_checkpoint_of_a_namespace_the_token_cannot_see(served, tmp_path):
    result = _cli(tmp_path, "checkpoint", served.url, "ckpt", "--token", "wrong")
    assert result.returncode == 1
    assert result.stderr.startswith("statehost checkpoint: ")
    assert "Traceback" not in result.stderr


# -- graceful shutdown ------------------------------------------------------------
def _stop(served, timeout=60):
    served.process.send_signal(signal.SIGTERM)
    return served.process.wait(timeout)


def test_sigterm_flushes_and_exits_zero(tmp_path):
    acknowledged = None
    with running_server(tmp_path, env=INTERVAL) as served:
        client = statehost.connect(served.url, token=served.token)
        counter = statehost.ShortTermState(jnp.zeros((), jnp.int32))
        client.put("team/c", counter)
        incr = client.jit(_incrementer(counter), pull=True)
        for _ in range(20):
            incr()
            acknowledged = int(counter.value)
        state = _state(client, "team/c")
        assert state["durable_version"] < state["version"]
        assert _stop(served) == 0, served.output()
        client.close()
        log = served.output()
    assert acknowledged == 20
    assert re.search(r"shutdown: flushed [1-9]\d* named state", log), log
    assert "Traceback" not in log

    with running_server(tmp_path, env=INTERVAL) as served:
        with statehost.connect(served.url, token=served.token) as client:
            assert int(client.get("team/c").value) == acknowledged
            state = _state(client, "team/c")
            assert state["durable_version"] == state["version"]
        assert _stop(served) == 0


def test_sigterm_lets_a_running_call_finish(tmp_path):
    marker = tmp_path / "call-started"

    def slow(x):
        def sleepy(v):
            open(marker, "w").close()  # noqa: SIM115
            time.sleep(2.0)
            return v

        return jax.pure_callback(sleepy, jax.ShapeDtypeStruct((), jnp.float32), x) + 1

    with running_server(tmp_path, env=INTERVAL) as served:
        client = statehost.connect(served.url, token=served.token)
        results, errors = [], []

        def call():
            try:
                results.append(client.jit(slow)(jnp.float32(1.0)))
            except Exception as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.02)
        assert marker.exists(), errors
        served.process.send_signal(signal.SIGTERM)
        thread.join(60)
        assert not errors, errors
        np.testing.assert_array_equal(np.asarray(results[0]), np.float32(2.0))
        assert served.process.wait(60) == 0, served.output()
        client.close()
