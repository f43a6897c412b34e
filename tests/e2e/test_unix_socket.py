"""``statehost serve --unix PATH``: the same API over a Unix socket, for clients on the host.

A real server listens on TCP and on the socket; clients connect with ``unix:///path``, or
with the loopback URL and move to the socket the server advertises.
"""

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client import AuthError
from tests.serving import running_server


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unix")
    path = tmp / "run" / "statehost.sock"
    with running_server(tmp, "--unix", str(path)) as served:
        served.socket = path
        yield served


def _work(client):
    """A synchronous call, asynchronous ones, a push/pull and a put/get; their results."""
    w = statehost.ParamState(jnp.zeros((8, 4)))
    step = client.pmap(lambda d: (setattr(w, "value", w.value + d), w.value.sum())[1],
                       axis_name="i", in_axes=0, out_axes=0,
                       state_in_axes={0: statehost.util.filter.OfType(statehost.ParamState)},
                       state_out_axes={0: statehost.util.filter.OfType(statehost.ParamState)})
    outs = [np.asarray(step(np.ones((8, 4), np.float32))) for _ in range(3)]
    client.sync()
    client.pull(w)
    big = statehost.ParamState(jnp.arange(2**18, dtype=jnp.float32))  # 1 MiB
    name = f"team/big-{os.getpid()}-{id(client)}"
    client.put(name, big)
    back = client.get(name)
    return outs, np.asarray(w.value), float(back.value.sum())


def test_the_socket_is_the_owners_only(served):
    mode = os.stat(served.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(served.socket.parent).st_mode) == 0o700


def test_a_unix_url_gives_what_tcp_gives(served):
    with statehost.connect(f"unix://{served.socket}", token=served.token) as over_unix:
        assert over_unix.via == f"unix://{served.socket}"
        on_unix = _work(over_unix)
    with statehost.connect(served.url, token=served.token) as client:
        client._http.use_unix(None)  # stay on TCP, for the comparison
        assert client.via == "tcp"
        on_tcp = _work(client)
    np.testing.assert_array_equal(on_unix[0], on_tcp[0])
    np.testing.assert_array_equal(on_unix[1], on_tcp[1])
    assert on_unix[2] == on_tcp[2] == float(np.arange(2**18).sum())


def test_a_loopback_url_moves_to_the_advertised_socket(served):
    info = httpx.get(f"{served.url}/v1/info",
                     headers={"authorization": f"Bearer {served.token}"}).json()
    assert info["unix_socket"] == str(served.socket)
    with statehost.connect(served.url, token=served.token) as client:
        assert client.via == f"unix://{served.socket}"
        assert f"via unix://{served.socket}" in repr(client)
        outs, weight, total = _work(client)
    assert [float(o[0]) for o in outs] == [4.0, 8.0, 12.0]
    np.testing.assert_array_equal(weight, np.full((8, 4), 3.0))


def test_tokens_are_still_required_on_the_socket(served):
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(served.socket)),
                      base_url="http://localhost") as raw:
        assert raw.get("/v1/info").status_code == 401
        assert raw.get("/v1/health").status_code == 200
    with pytest.raises(AuthError):
        statehost.connect(f"unix://{served.socket}", token="wrong")


def _serve_fails(tmp_path, *args):
    done = subprocess.run(
        [sys.executable, "-m", "statehost.server", "serve", "--port", "0", "--data-dir",
         str(tmp_path / "data"), *args], capture_output=True, text=True, timeout=120,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")},
             "STATEHOST_TOKENS": "t", "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 2, done.stdout + done.stderr
    return done.stderr


def test_a_live_servers_socket_is_not_taken(served, tmp_path):
    err = _serve_fails(tmp_path, "--unix", str(served.socket))
    assert "another server already answers on the Unix socket" in err
    assert served.process.poll() is None and os.path.exists(served.socket)


def test_a_directory_open_to_others_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    err = _serve_fails(tmp_path, "--unix", str(shared / "s.sock"))
    assert "is open to others (mode 755)" in err and "--unix PATH" in err


@pytest.fixture
def short_dir():
    """A directory with a short path (mode 0700): under pytest-xdist ``tmp_path`` grows by
    a worker's folder, and a socket's path may have at most 107 bytes (its .shm
    channel's too)."""
    path = Path(tempfile.mkdtemp(prefix="sh-run-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_auto_uses_the_runtime_dir_replaces_a_stale_socket_and_cleans_up(tmp_path,
                                                                          short_dir):
    runtime = short_dir
    path = runtime / "statehost" / "statehost.sock"
    path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a socket file nobody listens on: a killed server's
    stale.close()
    with running_server(tmp_path, env={"XDG_RUNTIME_DIR": str(runtime)}) as served, \
            statehost.connect(served.url, token=served.token) as client:
        assert client.via == f"unix://{path}"
        assert float(client.jit(lambda: jnp.ones(()) * 2)()) == 2.0
    assert not path.exists()  # removed when the server stopped
