"""A real server whose disk fails under a ``sync`` namespace: the call is answered 503
StorageError saying it was not applied, nothing moved in memory, and once the disk works
again a retry applies it exactly once.

The disk is broken the two ways an operator meets: a file size limit on the server
process (``prlimit --fsize``, as a full quota does) and an immutable state folder
(``chattr +i``, as a read-only mount does; root cannot write there either).
"""

import contextlib
import shutil
import subprocess

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client import StorageError
from tests.serving import running_server

BIG = 1 << 20  # float32 elements: a 4 MiB state file


@contextlib.contextmanager
def _file_size_limit(served, data_dir):
    pid = str(served.process.pid)
    result = subprocess.run(["prlimit", "--pid", pid, f"--fsize={1 << 20}:unlimited"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"prlimit cannot limit the server's file size here: {result.stderr}")
    try:
        yield
    finally:
        subprocess.run(["prlimit", "--pid", pid, "--fsize=unlimited:unlimited"], check=True)


@contextlib.contextmanager
def _immutable_folder(served, data_dir):
    folder = data_dir / "states" / "disk"
    result = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"chattr +i does not work on this file system: {result.stderr}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("break_disk", [_file_size_limit, _immutable_folder],
                         ids=["prlimit-fsize", "chattr-immutable"])
def test_a_sync_commit_on_a_failing_disk_is_not_applied(tmp_path, break_disk):
    tool = {"_file_size_limit": "prlimit", "_immutable_folder": "chattr"}[break_disk.__name__]
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} (util-linux / e2fsprogs) is not installed")
    with running_server(tmp_path) as served, \
            statehost.connect(served.url, token=served.token) as client:
        w = statehost.ParamState(jnp.zeros(BIG, jnp.float32), name="w")
        client.put("disk/w", w)
        response = httpx.put(f"{served.url}/v1/namespaces/disk", json={"durability": "sync"},
                             headers={"authorization": f"Bearer {served.token}"})
        assert response.status_code == 200, response.text
        step = client.jit(lambda: setattr(w, "value", w.value + 1))
        step()
        version = client.info("disk/w")["states"][0]["version"]
        with break_disk(served, tmp_path / "data"):
            step()  # returns at once (asynchronous dispatch): the failure comes at the sync
            with pytest.raises(StorageError) as info:
                client.sync()
            message = str(info.value)
            assert info.value.status == 503 and "the call was not applied" in message
            assert str(tmp_path) not in message
            assert client.info("disk/w")["states"][0]["version"] == version
            np.testing.assert_array_equal(w.value[:3], np.ones(3))
        step()
        assert client.info("disk/w")["states"][0]["version"] == version + 1
        np.testing.assert_array_equal(client.get("disk/w").value[:3], 2 * np.ones(3))
        assert httpx.get(f"{served.url}/v1/health").json()["status"] == "ok"
