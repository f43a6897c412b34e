"""The core's deferred-value protocol: a State whose value is fetched on first read."""

import copy
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.util.filter import OfType


class Counted(statehost.DeferredValue):
    """Resolves to ``value``, counting how often it was asked."""

    __slots__ = ("calls", "value", "fail")

    def __init__(self, value, fail=0):
        super().__init__(jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), value))
        self.value, self.calls, self.fail = value, 0, fail

    def resolve(self):
        self.calls += 1
        if self.fail:
            self.fail -= 1
            raise RuntimeError("fetch failed")
        return self.value


def deferred_state(value, cls=statehost.ParamState, **kw):
    state = cls(jnp.zeros_like(value))
    later = Counted(value, **kw)
    state.defer(later)
    return state, later


def test_read_resolves_once_and_is_not_a_new_write():
    state, later = deferred_state(jnp.arange(3.0))
    writes = state.write_count
    assert state.is_deferred and later.calls == 0
    assert state.value.tolist() == [0.0, 1.0, 2.0]
    assert state.value.tolist() == [0.0, 1.0, 2.0]
    assert later.calls == 1 and not state.is_deferred and state.write_count == writes


def test_repr_and_aval_fetch_nothing():
    state, later = deferred_state(jnp.ones((2, 4), jnp.float32))
    assert "ShapedArray(float32[2,4])" in repr(state)
    assert state.aval.shape == (2, 4) and later.calls == 0
    plain = statehost.State(np.zeros(3, np.int32))
    assert plain.aval.shape == (3,) and plain.aval.dtype == np.int32


def test_a_failed_resolve_raises_to_the_reader_and_stays_deferred():
    state, later = deferred_state(jnp.ones(2), fail=1)
    with pytest.raises(RuntimeError, match="fetch failed"):
        _ = state.value
    assert state.is_deferred
    assert state.value.tolist() == [1.0, 1.0] and later.calls == 2


def test_defer_refuses_a_plain_value():
    with pytest.raises(TypeError, match="expected a statehost.DeferredValue"):
        statehost.State(1.0).defer(2.0)


@pytest.mark.parametrize("transform", ["jit", "vmap", "pmap"])
def test_every_transform_resolves_deferred_values_before_use(transform):
    n = jax.device_count()
    state, later = deferred_state(jnp.arange(float(n)))

    def step(x):
        state.value = state.value + x
        return state.value * 2

    if transform == "jit":
        f = statehost.transform.jit(step)
    elif transform == "vmap":
        f = statehost.transform.vmap(step, in_axes=0,
                                     state_in_axes={0: OfType(statehost.ParamState)},
                                     state_out_axes={0: OfType(statehost.ParamState)})
    else:
        f = statehost.transform.pmap(step, axis_name="i", in_axes=0,
                                     state_in_axes={0: OfType(statehost.ParamState)},
                                     state_out_axes={0: OfType(statehost.ParamState)})
    out = f(jnp.ones(n))
    assert later.calls == 1
    np.testing.assert_allclose(np.asarray(out), (np.arange(n) + 1) * 2)
    np.testing.assert_allclose(np.asarray(state.value), np.arange(n) + 1)


def test_pickling_and_deepcopy_carry_the_real_value():
    state, later = deferred_state(jnp.arange(2.0))
    back = pickle.loads(pickle.dumps(state))
    assert back.id == state.id and back.value.tolist() == [0.0, 1.0]
    twin = copy.deepcopy(state)
    assert twin.id != state.id and twin.value.tolist() == [0.0, 1.0]
    assert later.calls == 1
