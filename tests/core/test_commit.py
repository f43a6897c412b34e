"""Deferred commits and the State helpers hosts use to stage and undo values."""

import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.transform import defer_writes, jit, pmap, vmap
from tests.core.models import PARAM, Affine


def test_deferred_writes_leave_states_untouched_until_commit():
    model = Affine(2)
    step = vmap(model, in_axes=0, state_in_axes={0: PARAM}, state_out_axes={0: PARAM})
    with defer_writes() as pending:
        out = step(jnp.ones((2, 4)))
    np.testing.assert_array_equal(model.weight.value, np.ones((2, 4)))
    assert model.weight.write_count == 0 and pending.states == [model.weight]
    np.testing.assert_array_equal(out, 2 * np.ones((2, 4)))
    pending.commit()
    np.testing.assert_array_equal(model.weight.value, 2 * np.ones((2, 4)))
    assert model.weight.write_count == 1 and pending.states == []


def test_dropping_pending_writes_is_a_rollback():
    model = Affine(8)
    step = pmap(model, axis_name="i", in_axes=0, state_in_axes={0: PARAM},
                state_out_axes={0: PARAM})
    with defer_writes():
        step(jnp.ones((8, 4)))
    np.testing.assert_array_equal(model.weight.value, np.ones((8, 4)))


def test_two_calls_in_one_block_compose():
    w = statehost.ParamState(jnp.zeros(()))

    @jit
    def tick():
        w.value = w.value + 1

    with defer_writes() as pending:
        tick()
        tick()
    assert float(w.value) == 0.0
    pending.commit()
    assert float(w.value) == 2.0


def test_random_streams_advance_only_on_commit():
    rng = statehost.random.RandomState(0)
    before = np.asarray(rng.value)
    draw = jit(lambda: rng.normal(size=(2,)))
    with defer_writes() as pending:
        draw()
    np.testing.assert_array_equal(rng.value, before)
    assert pending.states == [rng]


def test_restore_snapshot_and_revert():
    w = statehost.ParamState.restore(np.ones(2), id="c" * 32, name="w", tag="t")
    assert (type(w), w.id, w.name, w.tag, w.write_count) == (
        statehost.ParamState, "c" * 32, "w", "t", 0)
    snap = w.snapshot()
    w.value = np.zeros(2)
    assert w.write_count == 1
    w.revert(snap)
    np.testing.assert_array_equal(w.value, np.ones(2))
    assert w.write_count == 0


def test_a_pytree_state_is_checked_on_every_leaf():
    s = statehost.ParamState({"a": jnp.ones((2, 3)), "b": jnp.ones((2,))})
    step = vmap(lambda: s.value, state_in_axes={1: PARAM}, axis_size=3)
    with pytest.raises(statehost.BatchAxisError,
                       match=r"its value leaf \['b'\] has shape \(2,\)\. Use an axis from -1 to 0"):
        step()


def test_a_scalar_state_cannot_be_mapped():
    s = statehost.ParamState(jnp.zeros(()))
    step = vmap(lambda: s.value, state_in_axes={0: PARAM}, axis_size=2)
    with pytest.raises(statehost.BatchAxisError, match=r"is a scalar \(shape \(\)\), which has "
                                                       r"no axis to map over"):
        step()
