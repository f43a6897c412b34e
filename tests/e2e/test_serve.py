"""``statehost serve`` as a user runs it: a real uvicorn subprocess on a loopback port."""

import os
import re
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
import statehost.client
from tests.core.models import PARAM, Affine
from tests.serving import free_port, running_server

pytestmark = pytest.mark.long(seconds=110)  # started first: tests/conftest.py

PMAP = dict(axis_name="i", in_axes=0, out_axes=0, state_in_axes={0: PARAM},
            state_out_axes={0: PARAM})


def _metric(served, name, **labels):
    return served.metric(name, **labels)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve")) as served:
        yield served


def test_generated_token_is_private_and_found_by_the_client(tmp_path, monkeypatch):
    with running_server(tmp_path, token=None) as served:
        token_file = tmp_path / "xdg" / "statehost" / "token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert f"statehost.connect('{served.url}', token='{served.token}')" in served.output()
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
        with statehost.connect(served.url) as client:
            assert client.jit(lambda x: x * 2)(jnp.arange(3)).tolist() == [0, 2, 4]
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "elsewhere"))
        with pytest.raises(statehost.client.AuthError, match="no token"):
            statehost.connect(served.url)


def test_the_generated_token_survives_a_restart(tmp_path, monkeypatch):
    """A live kernel goes on after the server restarts: the generated token is kept with the
    server's files (0600) and the client's copy is written again."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    port, model = free_port(), Affine(8)
    with running_server(tmp_path, token=None, port=port) as first:
        kept = tmp_path / "data" / "generated-token"
        assert stat.S_IMODE(kept.stat().st_mode) == 0o600
        assert kept.read_text().strip() == first.token
        client = statehost.connect(first.url)
        step = client.pmap(model, **PMAP)
        step(jnp.ones((8, 4)))
    (tmp_path / "xdg" / "statehost" / "token").unlink()
    with running_server(tmp_path, token=None, port=port) as second:
        assert second.token == first.token
        assert f"token reused from {kept}" in second.output()
        step(jnp.ones((8, 4)))
        np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 3.0))
        client.close()


def test_a_loopback_client_rereads_the_token_file_when_refused(tmp_path, monkeypatch):
    """The server's token did change (its data dir was wiped): a client that read the token
    file reads it again on a 401 and goes on with the new token."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    port, model = free_port(), Affine(8)
    with running_server(tmp_path, token=None, port=port) as first:
        client = statehost.connect(first.url)
        step = client.pmap(model, **PMAP)
        step(jnp.ones((8, 4)))
    (tmp_path / "data" / "generated-token").unlink()
    with running_server(tmp_path, token=None, port=port) as second:
        assert second.token != first.token
        step(jnp.ones((8, 4)))  # a frame: refused, the file re-read, sent again
        assert client.list("team") == []  # JSON requests use the new token too
        np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 3.0))
        client.close()


def test_a_refused_token_says_when_the_servers_token_changed(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    port = free_port()
    with running_server(tmp_path, token=None, port=port) as first:
        pass
    (tmp_path / "data" / "generated-token").unlink()
    with running_server(tmp_path, token=None, port=port) as second:
        assert second.token != first.token
        # A token given explicitly is never swapped for the file's (it may be another
        # scope's), but the error says that the file changed, and when.
        with pytest.raises(statehost.client.AuthError,
                           match=r"(?s)not accepted.*token file .*statehost/token holds a "
                                 r"different token, written at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
                                 r".*the server's token changed then"):
            statehost.connect(second.url, token=first.token)
    with running_server(tmp_path, token="configured", port=port) as third:
        # The file still holds the generated token, which this server was not given.
        with pytest.raises(statehost.client.AuthError,
                           match=r"(?s)read from .*statehost/token \(written at .*\), which "
                                 r"this server does not accept.*STATEHOST_TOKENS"):
            statehost.connect(third.url)


def test_the_default_data_dir_follows_xdg_data_home(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "XDG_DATA_HOME": str(tmp_path / "share")}
    with running_server(tmp_path, env=env, data_dir_flag=False):
        assert (tmp_path / "share" / "statehost" / "statehost.db").is_file()
    assert not (tmp_path / "home" / ".local").exists()


def test_non_loopback_host_without_tokens_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "statehost.server", "serve", "--host", "0.0.0.0",
         "--port", str(free_port())],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "--insecure" in result.stderr and "STATEHOST_TOKENS" in result.stderr
    assert not (tmp_path / "statehost" / "token").exists()


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "statehost"
    result = subprocess.run([str(script), "serve", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    assert "--cpu-devices" in result.stdout and "--max-body" in result.stdout


def test_state_stays_resident_and_nothing_recompiles(served):
    with statehost.connect(served.url, token=served.token) as client:
        model = Affine(8)
        step = client.pmap(model, **PMAP)
        step(jnp.ones((8, 4)))
        state_bytes = _metric(served, "statehost_wire_bytes_total", direction="in",
                              part="state")
        compiles = _metric(served, "statehost_compiles_total")
        for _ in range(10):
            step(jnp.ones((8, 4)))
        assert _metric(served, "statehost_wire_bytes_total", direction="in",
                       part="state") == state_bytes
        assert _metric(served, "statehost_compiles_total") == compiles
        np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 12.0))

        lazy = client.pmap(model, pull=False, **PMAP)
        for _ in range(5):
            lazy(jnp.ones((8, 4)))
        np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 12.0))
        client.pull(model)
        np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 17.0))


def test_a_long_call_does_not_block_the_http_loop(served):
    def slow(x):
        def wait(v):
            time.sleep(2.0)
            return v

        return jax.pure_callback(wait, jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1

    answers = []
    with statehost.connect(served.url, token=served.token) as client:
        call = threading.Thread(target=lambda: answers.append(client.jit(slow)(jnp.ones(2))))
        call.start()
        during = []
        while call.is_alive():
            ok = httpx.get(served.url + "/v1/health", timeout=10).status_code == 200
            during.append(ok and call.is_alive())
            time.sleep(0.05)
        call.join()
    assert any(during), "no health answer arrived while the call ran"
    assert answers[0].tolist() == [2.0, 2.0]


def test_a_notebooks_own_exception_class_is_caught_by_it(served, tmp_path):
    """A class defined in __main__ (a notebook cell, a script) travels by value; the error
    that comes back is an instance of the caller's own class."""
    script = tmp_path / "kernel.py"
    script.write_text(textwrap.dedent(f"""
        import jax.numpy as jnp
        import statehost
        from statehost.client import RemoteExecutionError

        class NotConverged(Exception):
            pass

        def solve(x):
            raise NotConverged(f"residual too large after {{x.shape[0]}} steps")

        with statehost.connect({served.url!r}, token={served.token!r}) as client:
            try:
                client.jit(solve)(jnp.ones(3))
            except NotConverged as exc:
                assert isinstance(exc, RemoteExecutionError)
                assert "residual too large after 3 steps" in str(exc)
                print("caught", type(exc).__name__)
    """))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env={**env, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "caught RemoteExecutionError(NotConverged)" in run.stdout


def test_configured_tokens_are_never_printed(served):
    output = served.output()
    assert "configured token(s)" in output
    assert served.token not in output


def test_the_client_reconnects_after_a_server_restart(tmp_path):
    """Kept-alive connections die with the server; the next call opens a new one (and a new
    session, re-uploading the states whose newest values are local)."""
    port = free_port()
    model = Affine(8)
    with running_server(tmp_path, port=port) as served:
        client = statehost.connect(served.url, token=served.token)
        step = client.pmap(model, **PMAP)
        step(jnp.ones((8, 4)))
    with running_server(tmp_path, port=port):
        step(jnp.ones((8, 4)))
        np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 3.0))
        client.close()
    with pytest.raises(statehost.client.TransportError, match="cannot connect"):
        statehost.connect(served.url, token=served.token)


def test_a_call_longer_than_the_timeout_raises_transport_error(served):
    def slow(x):
        def wait(v):
            time.sleep(1.5)
            return v

        return jax.pure_callback(wait, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    with statehost.connect(served.url, token=served.token, timeout=0.5) as client:
        with pytest.raises(statehost.client.TransportError, match="no answer .* within 0.5 s"):
            client.jit(slow)(jnp.ones(2))


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_api_docs_load_everything_from_the_server_itself(served, page):
    """/docs works on a box with no internet: the page and every asset it references come
    from this server, none from a CDN."""
    with httpx.Client(base_url=served.url, timeout=30) as http:
        html = http.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        text = html.text
        assert "http://" not in text and "https://" not in text, text
        refs = set(re.findall(r'(?:src|href)="([^"]+)"', text))
        refs |= set(re.findall(r"""(?:url|spec-url)[:=] *['"]([^'"]+)['"]""", text))
        assert "/openapi.json" in refs
        assert any(r.endswith(".js") for r in refs), refs
        if page == "/docs":
            assert any(r.endswith(".css") for r in refs), refs
        for ref in sorted(refs):
            assert ref.startswith("/"), ref
            asset = http.get(ref)
            assert asset.status_code == 200, (ref, asset.status_code)
            assert len(asset.content) > 100, ref
            kind = asset.headers["content-type"]
            if ref.endswith(".js"):
                assert "javascript" in kind, (ref, kind)
                assert b"SwaggerUIBundle" in asset.content or b"Redoc" in asset.content
            elif ref.endswith(".css"):
                assert kind.startswith("text/css"), (ref, kind)
            elif ref.endswith(".png"):
                assert kind == "image/png", (ref, kind)
        assert http.get("/docs/assets/../../etc/passwd").status_code == 404
        missing = http.get("/docs/assets/nothing.js")
        assert missing.status_code == 404
        assert "no such asset; the docs use favicon.png" in missing.json()["error"]["message"]


def test_a_call_queued_past_call_timeout_is_dropped_and_the_stuck_one_listed(tmp_path):
    """``--call-timeout`` / ``--session-workers`` / STATEHOST_WORKERS on a real server: with
    one worker held by a host callback that sleeps, another client's call waits past the
    default deadline and is dropped, never started; the sleeping call is listed as stuck
    (past its deadline, so "cancel requested") and still commits: one device program cannot
    be interrupted (openxla/xla#16801)."""
    def slow(x):
        def wait(v):
            time.sleep(2.5)
            return v

        return jax.pure_callback(wait, jax.ShapeDtypeStruct(x.shape, x.dtype), x) + 1

    with running_server(tmp_path, "--call-timeout", "1", "--session-workers", "1",
                        env={"STATEHOST_WORKERS": "1"}) as served:
        auth = {"authorization": f"Bearer {served.token}"}
        limits = httpx.get(served.url + "/v1/info", headers=auth).json()["limits"]
        assert (limits["workers"], limits["session_workers"], limits["call_timeout"]) == \
            (1, 1, 1.0)
        with statehost.connect(served.url, token=served.token) as a, \
                statehost.connect(served.url, token=served.token) as b:
            quick = b.jit(lambda x: x * 2)
            np.testing.assert_array_equal(quick(jnp.ones(2)), 2 * np.ones(2))
            result: list = []
            thread = threading.Thread(target=lambda: result.append(a.jit(slow)(jnp.ones(2))))
            thread.start()
            while not httpx.get(served.url + "/v1/info", headers=auth).json()["calls"]["running"]:
                time.sleep(0.02)
            with pytest.raises(statehost.client.ClientError, match="never started, so nothing "
                               "was applied") as caught:
                np.asarray(quick(jnp.ones(2)))  # an asynchronous call raises where it is read
            assert type(caught.value).__name__ == "CallTimeoutError" and caught.value.status == 408
            calls = httpx.get(served.url + "/v1/info", headers=auth).json()["calls"]
            (stuck,) = calls["stuck"]
            assert stuck["session"] == a._session[:8] and stuck["cancel_requested"]
            thread.join(30)
            np.testing.assert_array_equal(result[0], 2 * np.ones(2))
        assert served.metric("statehost_call_timeouts_total") == 1
