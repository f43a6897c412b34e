"""A ``RemoteArray`` passed to local JAX functions, as a ``jax.Array`` would be."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client import RemoteArray
from statehost.client._jax_interop import UNSUPPORTED
from tests.inprocess import metric

BIG = (64, 4096)  # 1 MiB of float32: a fetch of it shows on the byte counter


def _fetched(client):
    return metric(client, "statehost_wire_bytes_total", direction="out", part="stream")


@pytest.fixture
def remote_ones(async_client):
    """A warm async call's output: a (64, 4096) float32 RemoteArray of ones, not fetched."""
    w = statehost.ParamState(jnp.ones(BIG))
    f = async_client.jit(lambda: w.value * 1)
    f()  # the first call of the signature is synchronous
    x = f()
    async_client.sync()
    assert isinstance(x, RemoteArray)
    return x


def test_the_registration_took(remote_ones):
    assert UNSUPPORTED == []


@pytest.mark.parametrize("fun, expected", [
    (jnp.sin, np.sin(np.ones(BIG, np.float32))),
    (jnp.sum, np.float32(BIG[0] * BIG[1])),
    (lambda x: jnp.add(x, 1.0), np.full(BIG, 2.0, np.float32)),
    (jax.jit(lambda x: x * 3), np.full(BIG, 3.0, np.float32)),
    (lambda x: jnp.where(x > 0, x, 0.0), np.ones(BIG, np.float32)),
    (lambda x: jnp.concatenate([x, x])[-1], np.ones(BIG[1], np.float32)),
    (jax.grad(lambda x: jnp.sum(x ** 2)), np.full(BIG, 2.0, np.float32)),
    (jax.vmap(jnp.mean), np.ones(BIG[0], np.float32)),
], ids=["sin", "sum", "add", "jit", "where", "concatenate", "grad", "vmap"])
def test_jax_functions_take_a_remote_array(remote_ones, fun, expected):
    out = fun(remote_ones)
    assert isinstance(out, jax.Array)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)


def test_tracing_moves_no_bytes_and_running_fetches_once(async_client, remote_ones):
    before = _fetched(async_client)
    shape = jax.eval_shape(lambda x: jnp.sin(x) @ x.T, remote_ones)
    assert (shape.shape, shape.dtype) == ((BIG[0], BIG[0]), np.float32)
    assert _fetched(async_client) == before  # shape and dtype were known
    jnp.sin(remote_ones)
    once = _fetched(async_client) - before
    assert once >= BIG[0] * BIG[1] * 4
    jnp.cos(remote_ones)
    jax.jit(lambda x: x + 1)(remote_ones)
    assert _fetched(async_client) - before == once  # the value is cached


def test_a_failed_call_raises_its_error_in_a_jax_function(async_client):
    count = statehost.State(jnp.zeros((), jnp.int32))

    def bump():
        count.value = count.value + 1
        jax.debug.callback(_refuse_above_one, count.value)
        return count.value

    step = async_client.jit(bump)
    step()
    failed = step()
    with pytest.raises(statehost.client.RemoteExecutionError, match="count 2 is above 1"):
        jnp.sin(failed)


def _refuse_above_one(value):
    if value > 1:
        raise ValueError(f"count {int(value)} is above 1")
