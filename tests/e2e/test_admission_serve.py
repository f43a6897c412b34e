"""``--device-memory`` and ``--namespace-weight`` on a real ``statehost serve``: the flags
reach the scheduler, and a call larger than the device is answered 507 over HTTP with
its state unchanged."""

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from tests.serving import running_server


def test_a_call_larger_than_the_configured_device_memory_is_refused(tmp_path):
    with running_server(tmp_path, "--device-memory", "2MiB", "--namespace-weight", "team=3",
                        ) as served:
        auth = {"authorization": f"Bearer {served.token}"}
        info = httpx.get(served.url + "/v1/info", headers=auth).json()
        assert info["admission"] == {"enabled": True, "device_memory": 2**21, "reserved": {}}
        assert (info["limits"]["namespace_weight"], info["limits"]["namespace_weights"]) == \
            (1, {"team": 3})
        with statehost.connect(served.url, token=served.token) as client:
            w = statehost.ParamState(jnp.zeros(2**18, jnp.float32))  # 1 MiB
            client.push(w)

            def grow():
                w.value = w.value + 1
                return jnp.ones(2**19, jnp.float32) * w.value[0]

            with pytest.raises(statehost.client.DeviceMemoryError,
                               match="more than the device's 2.0 MiB") as caught:
                np.asarray(client.jit(grow)())
            assert caught.value.status == 507
            client.pull(w)
            np.testing.assert_array_equal(np.asarray(w.value), np.zeros(2**18, np.float32))
            assert float(client.jit(lambda x: x * 2)(np.float32(3))) == 6.0
