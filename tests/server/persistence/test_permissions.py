"""statehost.server.persistence.permissions: the data directory is private to its user."""

import os
import stat

import jax.numpy as jnp
import pytest

import statehost
from statehost.server import Settings, create_app
from statehost.server.persistence import Database
from statehost.server.testing import InProcessTransport

TOKEN = "t"


@pytest.fixture
def loose_umask():
    old = os.umask(0o022)  # the usual default: files 0644, folders 0755
    yield
    os.umask(old)


def _modes(root):
    found = {root: stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[path] = stat.S_IMODE(path.stat().st_mode)
    return found


def test_a_server_writes_its_data_private(tmp_path, loose_umask):
    data = tmp_path / "data"
    app = create_app(Settings(tokens=(TOKEN,), data_dir=data, durability="sync"))
    transport = InProcessTransport(app)
    try:
        with statehost.connect("http://x", token=TOKEN, transport=transport,
                               dispatch="sync") as client:
            client.put("team/w", statehost.ParamState(jnp.arange(3.0)))
            modes = _modes(data)  # while running: the -wal and -shm files exist
    finally:
        transport.shutdown()
    names = {p.name for p in modes}
    assert {"statehost.db", "statehost.db-wal", "statehost.db-shm", "states", "team"} <= names
    assert any(n.endswith(".safetensors") for n in names), names
    # JAX writes its compile cache's entries itself, with the umask: they stay private
    # because their folder is 0700.
    cache = data / "compile-cache"
    assert modes.pop(cache) == 0o700
    wrong = {str(p.relative_to(tmp_path)): oct(m) for p, m in modes.items()
             if m != (0o700 if p.is_dir() else 0o600) and cache not in p.parents}
    assert not wrong, wrong


def test_an_older_world_readable_data_dir_is_tightened(tmp_path, loose_umask):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "statehost.db").touch(mode=0o644)
    Database(data / "statehost.db").close()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "statehost.db").stat().st_mode) == 0o600
