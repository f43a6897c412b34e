"""A client that pipelines collective programs faster than the devices run them cannot
take the server down.

On CPU devices, XLA runs every device's part of a program on one shared thread pool, and a
collective (``psum``, ``pmean``) holds a pool thread until every device has reached it.
With a few dozen such programs queued (JAX dispatches asynchronously, and so does the
client), the pool fills with waiting parts, the rest never run, and after 40 s XLA aborts
the process (``rendezvous.cc: Termination timeout for all reduce``): every client's
resident state gone. Observed on this 2-core machine with 200 asynchronous steps of
``bench_async``'s MLP, and with a plain ``jax.pmap`` of an 8x8 ``pmean`` dispatched 300
times ahead. The server keeps the devices at most a few programs behind
(``server/dispatch_window.py``).
"""

import jax
import jax.numpy as jnp
import numpy as np

import statehost
from statehost.util.filter import OfType
from tests.serving import running_server

LANES, N, ROUNDS, CALLS = 8, 64, 6, 300
PARAM = {0: OfType(statehost.ParamState)}


class Mixer(statehost.nn.Module):
    """One ``pmean`` per step over every lane: each lane's weights move to the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.w = statehost.ParamState(jnp.full((LANES, N, N), 1e-3, jnp.float32))

    def __call__(self, x):
        w = self.w.value
        for _ in range(ROUNDS):  # one all-reduce each, as a training step's gradients have
            w = w + 1e-3 * jax.lax.pmean(jnp.tanh(x @ w), "i")
        self.w.value = w
        return w[0, 0]


def _expected(x: np.ndarray, steps: int) -> np.ndarray:
    w = np.full((N, N), 1e-3, np.float32)  # every lane is the same: the mean is the lane
    for _ in range(steps * ROUNDS):
        w = w + np.float32(1e-3) * np.tanh(x[0] @ w)
    return w


def test_many_pipelined_collective_calls_run_and_the_server_serves_on(tmp_path):
    x = np.ones((LANES, N, N), np.float32)
    with running_server(tmp_path) as served, \
            statehost.connect(served.url, token=served.token, timeout=120,
                              dispatch="async") as client:
        model = Mixer()
        step = client.pmap(model, axis_name="i", in_axes=0, out_axes=0,
                           state_in_axes=PARAM, state_out_axes=PARAM, pull=False)
        out = None
        for _ in range(CALLS):
            out = step(x)
        client.sync()
        np.testing.assert_allclose(np.asarray(out), _expected(x, CALLS)[0, 0], rtol=1e-4)
        client.pull(model.w)
        np.testing.assert_allclose(np.asarray(model.w.value)[3], _expected(x, CALLS),
                                   rtol=1e-4)
        assert served.process.poll() is None, served.log.read_text()[-3000:]
