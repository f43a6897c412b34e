"""``statehost ls``, ``doctor``, ``checkpoint`` and a graceful SIGTERM, against real servers."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from tests.serving import free_port, running_server

pytestmark = pytest.mark.long(seconds=90)  # started first: tests/conftest.py

INTERVAL = {"STATEHOST_DURABILITY": "interval", "STATEHOST_FLUSH_INTERVAL": "3600"}


STATEHOST = Path(sys.executable).with_name("statehost")  # the console script, as users run it


def _cli(tmp_path, *args, timeout=120, **env):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    full_env.update({"XDG_CONFIG_HOME": str(tmp_path / "cli-xdg"), "JAX_PLATFORMS": "cpu", **env})
    return subprocess.run([str(STATEHOST), *args],
                          capture_output=True, text=True, env=full_env, timeout=timeout)


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


# -- the dispatcher: help, and what each command loads ------------------------------
def _help(capsys, *argv):
    from statehost._cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [(), ("serve",), ("token",), ("token", "create"),
                                  ("token", "list"), ("token", "revoke"), ("ls",), ("doctor",),
                                  ("checkpoint",), ("repair",)])
def test_help_is_plain_text(capsys, argv):
    out = _help(capsys, *argv)
    assert out.startswith(f"usage: statehost {' '.join(argv)}".rstrip())
    assert "``" not in out and ":func:" not in out


def _option_helps(out):
    """``{"--flag": its help on one line}`` from argparse's options section."""
    helps, flag = {}, None
    for line in out.split("\n\n", 2)[2].splitlines():  # after usage and description
        match = re.match(r"  (-\w, )?(--[a-z-]+)", line)
        if match:
            flag = match[2]
            helps[flag] = line[match.end():]
        elif flag and line.startswith("   "):
            helps[flag] += " " + line.strip()
        else:
            flag = None
    return helps


def test_serve_help_names_each_flags_variable_and_default(capsys):
    import dataclasses

    from statehost.server.settings import Settings

    out = _help(capsys, "serve")
    helps = _option_helps(out)
    variables = {f"STATEHOST_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    cli_only = {"--help", "--log-level", "--access-log"}
    for flag, text in helps.items():
        if flag in cli_only:
            continue
        named = set(re.findall(r"STATEHOST_[A-Z_]+", text))
        assert len(named) == 1 and named <= variables, (flag, text)
        assert f"{named.pop()}, default " in text, (flag, text)
    assert set(helps) >= {"--host", "--port", "--data-dir", "--shutdown-grace"} | cli_only
    assert "(STATEHOST_SHUTDOWN_GRACE, default 30)" in helps["--shutdown-grace"]
    assert "(STATEHOST_PORT, default 8470)" in helps["--port"]
    assert variables <= set(re.findall(r"STATEHOST_[A-Z_]+", out)), "a variable is not shown"


def _loaded_by(tmp_path, *argv):
    """Which statehost layers and libraries a fresh ``statehost ARGV`` process loads."""
    script = (
        "import contextlib, io, sys\n"
        "from statehost._cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()),"
        " contextlib.suppress(SystemExit):\n"
        f"    main({list(argv)!r})\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=120, check=True)
    return set(result.stdout.split())


def _closed_url():
    return f"http://127.0.0.1:{free_port()}"


def _layers(modules):
    return {layer for layer in ("statehost.client", "statehost.server", "httpx", "fastapi")
            if any(m == layer or m.startswith(layer + ".") for m in modules)}


def test_help_loads_neither_the_client_nor_the_server(tmp_path):
    assert _layers(_loaded_by(tmp_path, "--help")) == set()


def test_token_commands_do_not_load_the_client(tmp_path):
    loaded = _loaded_by(tmp_path, "token", "list", "--data-dir", str(tmp_path / "data"))
    assert _layers(loaded) == {"statehost.server"}


@pytest.mark.parametrize("command", ["ls", "doctor", "checkpoint"])
def test_client_commands_do_not_load_the_server(tmp_path, command):
    loaded = _loaded_by(tmp_path, command, "--url", _closed_url(), "--timeout", "2")
    assert _layers(loaded) == {"statehost.client", "httpx"}


# The package __init__s load their names lazily (statehost/_lazy.py), so a command loads
# JAX only when it runs something that needs it (serve).
@pytest.mark.parametrize("argv", [("--help",), ("token", "list"), ("ls",), ("checkpoint",),
                                  ("doctor",)])
def test_commands_that_need_no_jax_do_not_import_it(tmp_path, argv):
    if argv[0] == "token":
        argv = (*argv, "--data-dir", str(tmp_path / "data"))
    elif argv[0] != "--help":
        argv = (*argv, "--url", _closed_url(), "--timeout", "2")
    assert "jax" not in _loaded_by(tmp_path, *argv)


# -- ls ---------------------------------------------------------------------------
def test_ls_shows_a_put_object_with_version_and_bytes(served, tmp_path):
    with statehost.connect(served.url, token=served.token) as client:
        counter = statehost.ShortTermState(jnp.zeros((3,), jnp.int32))
        client.put("lsns/counter", counter)
        client.jit(_incrementer(counter))()
        state = _state(client, "lsns/counter")
    result = _cli(tmp_path, "ls", "--url", served.url, "--token", served.token)
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
    result = _cli(tmp_path, "ls", "--url", served.url, "--token", "wrong")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "statehost ls: " in result.stderr and "not accepted" in result.stderr


def test_ls_namespace_lists_only_that_namespace_and_url_comes_from_the_environment(
        served, tmp_path):
    with statehost.connect(served.url, token=served.token) as client:
        for name in ("lsone/a", "lstwo/b"):
            client.put(name, statehost.ShortTermState(jnp.zeros((2,), jnp.float32)))
    result = _cli(tmp_path, "ls", "lsone", "--token", served.token, STATEHOST_URL=served.url)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("lsone  (durability interval, 1 object(s)"), result.stdout
    assert "lstwo" not in result.stdout


def test_ls_of_a_namespace_that_is_not_visible(served, tmp_path):
    result = _cli(tmp_path, "ls", "nosuchns", "--url", served.url, "--token", served.token)
    assert result.returncode == 1
    assert result.stderr.startswith("statehost ls: namespace 'nosuchns' is not visible on "
                                    f"{served.url}"), result.stderr
    assert "Traceback" not in result.stderr


def test_ls_without_a_server_fails_in_one_line(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = _cli(tmp_path, "ls", "--url", url, "--token", "x", "--timeout", "5")
    assert result.returncode == 1
    assert result.stderr.startswith(f"statehost ls: GET /v1/namespaces: cannot connect to {url}"), \
        result.stderr
    assert "Is `statehost serve` running there?" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["ls", "checkpoint"])
def test_a_url_where_the_name_goes_says_to_use_url(tmp_path, command):
    url = f"http://127.0.0.1:{free_port()}"
    result = _cli(tmp_path, command, url)
    assert result.returncode == 2
    assert f"{url!r} is a URL" in result.stderr
    assert f"Fix: statehost {command} --url {url}" in result.stderr


# -- doctor -----------------------------------------------------------------------
def test_doctor_against_a_matching_server(served, tmp_path):
    result = _cli(tmp_path, "doctor", "--url", served.url, "--token", served.token)
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
    from statehost._cli import main

    real = statehost.wire._versions.local_versions()
    monkeypatch.setattr(statehost.wire, "local_versions", lambda: {**real, "jax": "0.1.0"})
    assert main(["doctor", "--url", served.url, "--token", served.token]) == 1
    out = capsys.readouterr().out
    jax_line = next(x for x in out.splitlines()[1:] if x.split()[:1] == ["jax"])
    assert jax_line.split()[1:] == ["0.1.0", real["jax"], "MISMATCH"]
    assert "REFUSED" in out and f"jax: client has 0.1.0, server has {real['jax']}" in out


def test_doctor_with_a_wrong_token(served, tmp_path):
    result = _cli(tmp_path, "doctor", "--url", served.url, "--token", "not-a-token")
    assert result.returncode == 1
    assert "the token is not accepted by this server" in result.stdout
    assert "statehost token create" in result.stdout


def test_doctor_without_a_token_says_how_to_get_one(served, tmp_path):
    result = _cli(tmp_path, "doctor", "--url", served.url)
    assert result.returncode == 1
    assert "no token was sent" in result.stdout and "--token" in result.stdout


def test_doctor_against_a_closed_port(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = _cli(tmp_path, "doctor", "--url", url, "--token", "x", "--timeout", "5")
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

        result = _cli(tmp_path, "checkpoint", "ckpt/c", "--url", served.url, "--token",
                      served.token)
        assert result.returncode == 0, result.stderr
        assert "ckpt/c: flushed 1 state(s)" in result.stdout
        after = _state(client, "ckpt/c")
        assert after["durable_version"] == after["version"] == before["version"]

        client.jit(_incrementer(counter))()
        result = _cli(tmp_path, "checkpoint", "--url", served.url, "--token", served.token)
        assert result.returncode == 0, result.stderr
        assert "ckpt: flushed 1 state(s)" in result.stdout
        after = _state(client, "ckpt/c")
        assert after["durable_version"] == after["version"]


def test_checkpoint_of_a_namespace_the_token_cannot_see(served, tmp_path):
    result = _cli(tmp_path, "checkpoint", "ckpt", "--url", served.url, "--token", "wrong")
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


def _never_returns(marker, held=None):
    """A function whose call never returns; with ``held``, the call holds that state."""

    def sleepy(v):
        open(marker, "w").close()  # noqa: SIM115
        time.sleep(1000)
        return v

    def stuck(x):
        out = jax.pure_callback(sleepy, jax.ShapeDtypeStruct((), jnp.float32), x)
        if held is not None:
            held.value = held.value + out.astype(jnp.int32)
        return out

    return stuck


def _sigterm_during_a_call_that_never_returns(served, client, marker, held=None, grace=2.0):
    """Starts the call, sends SIGTERM once it runs; returns (exit status, log)."""

    def call():
        with contextlib.suppress(Exception):  # the server goes away under it
            client.jit(_never_returns(marker, held))(jnp.float32(1.0))

    threading.Thread(target=call, daemon=True).start()
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), served.output()
    started = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    try:
        status = served.process.wait(grace + 10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {grace + 10:g} s after SIGTERM:\n{served.output()}")
    assert time.monotonic() - started >= grace, served.output()
    return status, served.output()


def _dirty_counter(client, name):
    """A named counter at 1 whose disk copy (checkpointed at 0) is one version behind."""
    counter = statehost.ShortTermState(jnp.zeros((), jnp.int32))
    client.put(name, counter)
    client.checkpoint(name)
    client.jit(_incrementer(counter))()
    state = _state(client, name)
    assert state["durable_version"] < state["version"]  # the flush interval is an hour
    return counter


def test_sigterm_with_a_call_that_never_returns_flushes_and_exits_4(tmp_path):
    marker = tmp_path / "call-started"
    with running_server(tmp_path, "--shutdown-grace", "2", env=INTERVAL) as served:
        with statehost.connect(served.url, token=served.token) as client:
            _dirty_counter(client, "team/c")
            status, log = _sigterm_during_a_call_that_never_returns(served, client, marker)
    assert status == 4, log
    assert "abandoned 1 call(s) still running 2 s after the shutdown began" in log, log
    assert "shutdown: flushed 1 named state(s)" in log, log

    with running_server(tmp_path, env=INTERVAL) as served:
        with statehost.connect(served.url, token=served.token) as client:
            assert int(client.get("team/c").value) == 1
            state = _state(client, "team/c")
            assert state["durable_version"] == state["version"]


def test_states_an_abandoned_call_holds_do_not_keep_the_others_from_disk(tmp_path):
    marker = tmp_path / "call-started"
    env = {**INTERVAL, "STATEHOST_SHUTDOWN_GRACE": "1"}
    with running_server(tmp_path, env=env) as served:
        with statehost.connect(served.url, token=served.token) as client:
            _dirty_counter(client, "team/free")
            held = _dirty_counter(client, "team/held")
            status, log = _sigterm_during_a_call_that_never_returns(
                served, client, marker, held, grace=1.0)
    assert status == 4, log
    assert "abandoned 1 call(s)" in log, log
    assert "shutdown: flushed 1 named state(s)" in log, log
    assert "1 named state(s) they hold keep their last flushed version" in log, log

    with running_server(tmp_path, env=INTERVAL) as served:
        with statehost.connect(served.url, token=served.token) as client:
            assert int(client.get("team/free").value) == 1
            assert int(client.get("team/held").value) == 0  # its last flushed version
