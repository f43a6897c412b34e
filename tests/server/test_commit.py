"""Commit is the last step: a failure after the run (copying results out, a sync disk
write) leaves every state's value and version as they were, and the answer says so."""

import shutil

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client import ServerError, StorageError
from tests.inprocess import TOKEN, URL


def _version(client, name):
    return client.info(name)["states"][0]["version"]


def test_a_failing_copy_to_the_host_commits_nothing(client, monkeypatch):
    import statehost.server.execution as execution

    w = statehost.ParamState(jnp.ones(3))
    client.put("team/w", w)
    step = client.jit(lambda: setattr(w, "value", w.value + 1) or w.value)
    step()
    assert _version(client, "team/w") == 2

    def broken(tree, where):
        raise ServerError(f"{where}: simulated device-to-host failure; nothing was applied")

    monkeypatch.setattr(execution, "to_host", broken)
    with pytest.raises(ServerError, match="nothing was applied"):
        step()
    monkeypatch.undo()
    assert _version(client, "team/w") == 2  # was 3: committed although the call failed
    again = client.get("team/w")
    np.testing.assert_array_equal(again.value, 2 * np.ones(3))
    step()
    np.testing.assert_array_equal(w.value, 3 * np.ones(3))
    assert _version(client, "team/w") == 3


@pytest.fixture
def sync_namespace(client):
    with httpx.Client(base_url=URL, transport=client._http.client._transport) as http:
        response = http.put("/v1/namespaces/durable", json={"durability": "sync"},
                            headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    return "durable"


def test_a_sync_commit_that_cannot_reach_the_disk_is_not_applied(client, app, sync_namespace):
    data_dir = app.state.runtime.settings.data_dir
    w = statehost.ParamState(jnp.zeros(2), name="w")
    client.put("durable/w", w)
    step = client.jit(lambda: setattr(w, "value", w.value + 1))
    step()
    assert _version(client, "durable/w") == 2
    folder = data_dir / "states" / "durable"
    shutil.rmtree(folder)
    folder.write_text("not a folder: every write below it fails")
    with pytest.raises(StorageError) as info:
        step()
    message = str(info.value)
    assert info.value.status == 503
    assert "the call was not applied" in message and "'sync'" in message
    assert str(data_dir) not in message  # no server paths in answers
    np.testing.assert_array_equal(w.value, np.ones(2))
    assert _version(client, "durable/w") == 2
    np.testing.assert_array_equal(client.get("durable/w").value, np.ones(2))
    folder.unlink()
    folder.mkdir()
    step()  # a retry applies it exactly once
    assert _version(client, "durable/w") == 3
    np.testing.assert_array_equal(client.get("durable/w").value, 2 * np.ones(2))


def test_a_failed_upload_rolls_back_the_values_staged_before_it(client, transport):
    """Two uploads in one push: the second cannot be placed on a device; neither lands."""
    a = statehost.ParamState(jnp.ones(2))
    client.push(a)
    a.value = jnp.full(2, 5.0)
    b = statehost.ParamState("a string is no device value")
    with pytest.raises(statehost.client.ValidationError, match="cannot be placed on the "
                                                               "server's devices"):
        client.push([a, b])
    client.pull(a)
    np.testing.assert_array_equal(a.value, np.ones(2))
