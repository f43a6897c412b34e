"""``statehost.client._outputs``: a reply's outputs become the ``jax.Array``s the call returned."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client._outputs import as_array, local_outputs
from statehost.wire import CallReply, pack


def _aval(x):
    """Shape, dtype and weak type (``jax.typeof`` also compares shardings)."""
    return x.shape, x.dtype, x.weak_type


def _weak_arange(n):
    """The seed's ``add_with_scale`` output: int32 + a Python float, weak float32."""
    with jax.numpy_dtype_promotion("standard"):  # conftest makes promotion strict
        return jnp.arange(n) + 0.5


def _reply(out, weak_types):
    results = pack(jax.device_get(out), refs=False, code=False)
    return CallReply(call_id="c", weak_types=weak_types, results=results)


def test_a_weak_output_comes_back_weak_and_prints_as_locally():
    local = _weak_arange(8)

    got = local_outputs(_reply(local, (True,)))

    assert isinstance(got, jax.Array)
    assert repr(got) == repr(local)
    assert repr(got).endswith("dtype=float32, weak_type=True)")
    assert _aval(got) == _aval(local)


def test_a_weak_output_promotes_like_the_local_one():
    local = _weak_arange(4)
    got = local_outputs(_reply(local, (True,)))
    half = jnp.ones(4, jnp.bfloat16)

    with jax.numpy_dtype_promotion("standard"):
        assert (got + half).dtype == (local + half).dtype == jnp.bfloat16
    assert jax.jit(lambda x: x * 2)(got).weak_type


def test_outputs_keep_their_tree_dtype_and_strong_types():
    local = {"a": jnp.ones((2, 3), jnp.int32), "b": (jnp.asarray(2.0), jnp.zeros(2))}

    got = local_outputs(_reply(local, (False, True, False)))

    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(local)
    for g, x in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(local),
                    strict=True):
        assert isinstance(g, jax.Array) and _aval(g) == _aval(x)
        np.testing.assert_array_equal(g, x)


def test_a_reply_without_weak_types_gives_strong_arrays():
    got = local_outputs(_reply([jnp.ones(2)], ()))

    assert isinstance(got[0], jax.Array) and not got[0].weak_type


def test_a_reply_with_the_wrong_number_of_weak_types_is_refused():
    with pytest.raises(statehost.WireError, match="lists 1 weak_types for 2 output leaves"):
        local_outputs(_reply([jnp.ones(2), jnp.ones(3)], (True,)))


@pytest.mark.parametrize("value", [None, 3, "text"])
def test_leaves_that_are_not_host_arrays_are_left_alone(value):
    assert as_array(value) is value


def test_a_numpy_scalar_becomes_a_0d_array():
    got = as_array(np.float32(1.5), weak_type=True)

    assert repr(got) == repr(jnp.asarray(1.5))


@pytest.mark.parametrize("weak_type", [False, True])
@pytest.mark.parametrize("value", [
    np.ones((2, 3), np.float32), np.float32(1.5), np.arange(4, dtype=np.int8), np.array(True),
    np.ones(3, jnp.bfloat16), np.zeros((0, 2), np.complex64),
    np.ones(3, np.float64),  # not a dtype JAX keeps (x64 off): the public path
    np.ones((4, 4), np.float32)[:, ::2],  # not contiguous: the public path
], ids=repr)
def test_the_direct_path_makes_what_jnp_asarray_makes(value, weak_type):
    """``as_array`` skips ``jnp.asarray``'s primitive dispatch where it can (a private
    JAX step, ``_outputs._direct_put``); what it returns must not differ in any way."""
    expected = jnp.asarray(value)
    if weak_type:
        expected.aval = expected.aval.update(weak_type=True)

    got = as_array(value, weak_type)

    assert type(got) is type(expected) and _aval(got) == _aval(expected)
    assert got.sharding == expected.sharding and got.committed == expected.committed
    assert repr(got) == repr(expected)
    np.testing.assert_array_equal(got, expected)


def test_the_direct_path_honours_the_default_device():
    device = jax.devices()[-1]
    with jax.default_device(device):
        got = as_array(np.ones(2, np.float32))
    assert got.devices() == {device} and not got.committed
