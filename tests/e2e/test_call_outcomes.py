"""A blocking call whose answer does not come in time says what became of it."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client import TransportError
from tests.serving import running_server


def _sleep(seconds):
    time.sleep(float(seconds))


def test_a_timed_out_call_says_it_is_still_running_and_then_commits(tmp_path):
    # timeout 2.5 s: the first call's compile must fit in it on a loaded 2-core machine
    with running_server(tmp_path) as served, \
            statehost.connect(served.url, token=served.token, timeout=2.5,
                              dispatch="sync") as client:
        count = statehost.State(jnp.zeros((), jnp.int32))

        def slow(seconds):
            jax.debug.callback(_sleep, seconds)
            count.value = count.value + 1
            return count.value

        step = client.jit(slow)
        assert int(step(0.0)) == 1
        with pytest.raises(TransportError, match="is still running on the server") as info:
            step(5.0)
        assert "it commits when it ends" in str(info.value)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(0.3)
            try:
                client.pull(count)  # waits for the running call's lock: may time out too
            except TransportError:
                continue
            if int(count.value) == 2:
                break
        np.testing.assert_array_equal(np.asarray(count.value), 2)  # committed once


def test_a_call_that_times_out_before_it_starts_is_cancelled(tmp_path):
    with running_server(tmp_path) as served, \
            statehost.connect(served.url, token=served.token, timeout=1.0,
                              dispatch="sync") as client, \
            statehost.connect(served.url, token=served.token, dispatch="sync") as other:
        count = statehost.State(jnp.zeros((), jnp.int32))
        other.put("lab/count", count)
        shared = client.get("lab/count")

        def slow(seconds):
            jax.debug.callback(_sleep, seconds)
            count.value = count.value + 1

        def bump():
            shared.value = shared.value + 1

        holder = threading.Thread(target=lambda: other.jit(slow)(3.0))
        holder.start()
        time.sleep(0.8)  # the other client's call holds lab/count now
        with pytest.raises(TransportError, match="was cancelled before it started"):
            client.jit(bump)()
        holder.join(30)
        assert int(client.get("lab/count").value) == 1  # only the holder's call applied
