"""A damaged ``statehost.db``: the server refuses to start, and ``statehost repair`` rebuilds
it from the state files, so a restarted server serves the named states as they were."""

import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import statehost
import statehost.client
from tests.core.models import Affine
from tests.serving import free_port, running_server

pytestmark = pytest.mark.long(seconds=90)  # started first: tests/conftest.py

LANES = 8


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    env.update({"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "JAX_PLATFORMS": "cpu",
                "STATEHOST_TOKENS": "test-token"})
    return env


def _statehost(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "statehost.server", *args],
                          capture_output=True, text=True, timeout=120, env=_env(tmp_path))


def _increment(counter):
    def incr():
        counter.value = counter.value + 1

    return incr


def _versions(client, name):
    return {s["name"]: s["version"] for s in client.info(name)["states"]}


def _damage(db, how):
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    if how == "page":  # one page of a table overwritten, as a bad disk sector would
        assert len(data) >= 4 * page
        data[2 * page : 3 * page] = b"\xa5" * page
    elif how == "header":
        data[:16] = b"not a database!\0"
    else:  # "empty"
        data = bytearray()
    db.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A data directory a server wrote and shut down cleanly, and the versions it served:
    made once, copied for each kind of damage (its files name each other relatively)."""
    tmp = tmp_path_factory.mktemp("written")
    with running_server(tmp) as served, \
            statehost.connect(served.url, token=served.token) as client:
        model = Affine(LANES)
        client.put("team/net", model)
        client.pmap(model, axis_name="i", in_axes=0, out_axes=0,
                    state_in_axes={0: statehost.ParamState},
                    state_out_axes={0: statehost.ParamState})(jnp.ones((LANES, 4)))
        counter = statehost.ShortTermState(jnp.zeros((), jnp.int32))
        client.put("lab/counter", counter)
        incr = client.jit(_increment(counter))
        for _ in range(3):
            incr()
        before = {"team/net": _versions(client, "team/net"),
                  "lab/counter": _versions(client, "lab/counter")}
    return tmp / "data", before


@pytest.mark.parametrize("how", ["page", "header", "empty"])
def test_server_refuses_a_damaged_database_and_repair_rebuilds_it(tmp_path, how, written):
    data, before = written
    shutil.copytree(data, tmp_path / "data")
    db = tmp_path / "data" / "statehost.db"
    assert not db.with_name("statehost.db-wal").exists()  # checkpointed at shutdown
    _damage(db, how)

    refused = _statehost(tmp_path, "serve", "--port", str(free_port()), "--data-dir",
                         str(tmp_path / "data"))
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output
    assert f"the metadata database {db} is damaged" in output
    assert f"statehost repair --data-dir {tmp_path / 'data'}" in output
    assert "Traceback" not in output

    repaired = _statehost(tmp_path, "repair", "--data-dir", str(tmp_path / "data"))
    assert repaired.returncode == 0, repaired.stderr
    assert "rebuilt" in repaired.stdout and "2 object(s), 2 state(s) in 2 namespace(s)" \
        in repaired.stdout, repaired.stdout
    assert "Tokens cannot be recovered" in repaired.stdout
    assert list(db.parent.glob("statehost.db.damaged-*")), "the damaged file is kept aside"

    with running_server(tmp_path) as served, \
            statehost.connect(served.url, token=served.token) as client:
        assert {name: _versions(client, name) for name in before} == before
        net = client.get("team/net")
        np.testing.assert_array_equal(net.weight.value, np.full((LANES, 4), 2.0))
        assert int(client.get("lab/counter").value) == 3
        assert client.info("team/net")["durability"] == "interval"


def test_repair_leaves_an_intact_database_alone(tmp_path):
    with running_server(tmp_path) as served, \
            statehost.connect(served.url, token=served.token) as client:
        client.put("team/w", statehost.ParamState(jnp.arange(3.0)))
    before = (tmp_path / "data" / "statehost.db").read_bytes()
    result = _statehost(tmp_path, "repair", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 0 and "nothing to repair" in result.stdout, result.stdout
    assert (tmp_path / "data" / "statehost.db").read_bytes() == before
