"""The compile cache against a real ``statehost serve``: clients in their own processes.

Each client is a script run with ``python``, as two users' notebooks would be: its
function lives in ``__main__`` and travels by value. The server's ``/metrics`` says
where each program came from (``statehost_compiles_total{source=...}``).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.serving import running_server

pytestmark = pytest.mark.long(seconds=55)  # started first: tests/conftest.py

CLIENT = textwrap.dedent("""
    import json, sys, time
    import jax.numpy as jnp, numpy as np
    import statehost
    from statehost.util.filter import OfType

    url, token, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
    weight = statehost.ParamState(jnp.full((8, 4), start, dtype=jnp.float32))

    def step(delta):
        weight.value = weight.value + delta
        return (weight.value * 2.0).sum(axis=-1)

    params = OfType(statehost.ParamState)
    with statehost.connect(url, token=token) as client:
        remote = client.pmap(step, axis_name="i", in_axes=0, out_axes=0,
                             state_in_axes={0: params}, state_out_axes={0: params})
        began = time.perf_counter()
        out = np.asarray(remote(jnp.ones((8, 4))))
        seconds = time.perf_counter() - began
    print(json.dumps({"out": out.tolist(), "weight": np.asarray(weight.value).tolist(),
                      "seconds": seconds}))
""")


@pytest.fixture
def client_script(tmp_path):
    path = tmp_path / "client.py"
    path.write_text(CLIENT)
    return path


def _run_client(script, served, start):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run([sys.executable, str(script), served.url, served.token, str(start)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Its own state: (start + 1) summed over 4 columns, doubled, on each of 8 lanes.
    assert result["out"] == [8.0 * (start + 1)] * 8
    assert result["weight"] == [[start + 1] * 4] * 8
    return result


def _sources(served):
    return {s: served.metric("statehost_compiles_total", source=s)
            for s in ("fresh", "shared", "persistent")}


def test_a_second_client_compiles_nothing_and_a_restart_loads_from_disk(tmp_path, client_script):
    with running_server(tmp_path) as served:
        _run_client(client_script, served, 1.0)
        assert _sources(served) == {"fresh": 1, "shared": 0, "persistent": 0}
        _run_client(client_script, served, 10.0)  # another process, another session
        assert _sources(served) == {"fresh": 1, "shared": 1, "persistent": 0}
    assert any((tmp_path / "data" / "compile-cache").iterdir())

    with running_server(tmp_path) as served:
        _run_client(client_script, served, 3.0)
        assert _sources(served) == {"fresh": 0, "shared": 0, "persistent": 1}


def test_with_the_compile_cache_off_a_restart_compiles_again(tmp_path, client_script):
    for _ in range(2):
        with running_server(tmp_path, env={"STATEHOST_COMPILE_CACHE": "0"}) as served:
            _run_client(client_script, served, 1.0)
            assert _sources(served) == {"fresh": 1, "shared": 0, "persistent": 0}
    assert not (tmp_path / "data" / "compile-cache").exists()
