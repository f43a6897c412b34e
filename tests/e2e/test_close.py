"""``client.close()`` against a real server: what a closed client can still read.

Closing waits for the calls in flight, then fetches the outputs still held and the state
values not read yet, so that ``with connect(...) as client: loss = step()`` followed by
``print(loss)`` reads as it would locally. When the server is gone by then, closing still
returns at once, and each read says what was lost and why.
"""

import signal

import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client import ClientClosedError
from tests.serving import running_server


def _counting():
    count = statehost.ShortTermState(jnp.zeros((), jnp.int32))

    def bump():
        count.value = count.value + 1
        return count.value * 10

    return count, bump


def test_outputs_and_states_read_after_the_with_block(tmp_path):
    count, bump = _counting()
    with running_server(tmp_path) as served, \
            statehost.connect(served.url, token=served.token) as client:
        step = client.jit(bump)
        outs = [step() for _ in range(4)]  # the first blocking, then asynchronous
    assert [int(x) for x in outs] == [10, 20, 30, 40]
    assert int(count.value) == 4


def test_a_server_gone_before_close_makes_each_read_say_why(tmp_path):
    count, bump = _counting()
    with running_server(tmp_path) as served:
        client = statehost.connect(served.url, token=served.token, timeout=10)
        step = client.jit(bump)
        step()  # blocking: its value came with the reply
        out = step()  # asynchronous: stays on the server
        out.block_until_ready()
        served.process.send_signal(signal.SIGKILL)
        served.process.wait(timeout=30)
        client.close()  # returns: nothing to raise for calls that committed
    with pytest.raises(ClientClosedError, match="fetching it when the client closed failed"):
        np.asarray(out)
    with pytest.raises(ClientClosedError, match="fetching it when the client closed failed"):
        count.value  # noqa: B018
