"""``StatefulCall.lower``: the program a call would run, lowered without running it (the
server compiles it to estimate a call's device memory before admitting it)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.transform import jit, pmap, vmap


def _model():
    w = statehost.ParamState(jnp.zeros((8, 256), jnp.float32))
    rng = statehost.random.RandomState(0)
    return w, rng


def _transforms(w, rng):
    def step(x):
        w.value = w.value + x + rng.normal(size=x.shape)
        return w.value.sum()

    def lane(x):
        w.value = w.value + x
        return w.value.sum()

    filt = statehost.util.filter.OfType(statehost.ParamState)
    return {
        "jit": (jit(step), jnp.ones((8, 256), jnp.float32), 8 * 256 * 4),
        "vmap": (vmap(lane, in_axes=0, state_in_axes={0: filt}, state_out_axes={0: filt}),
                 jnp.ones((8, 256), jnp.float32), 8 * 256 * 4),
        # pmap: one device program per lane, so the figures are one device's
        "pmap": (pmap(lane, in_axes=0, state_in_axes={0: filt}, state_out_axes={0: filt}),
                 jnp.ones((8, 256), jnp.float32), 256 * 4),
    }


@pytest.mark.parametrize("kind", ["jit", "vmap", "pmap"])
def test_lower_compiles_what_the_call_runs_and_changes_nothing(kind):
    w, rng = _model()
    transform, x, state_bytes = _transforms(w, rng)[kind]
    key_before = np.asarray(jax.random.key_data(rng.value))
    lowered = transform.lower(x)
    stats = lowered.compile().memory_analysis()
    assert stats.output_size_in_bytes >= state_bytes  # the new state value is an output
    assert stats.argument_size_in_bytes >= state_bytes + x.nbytes // (8 if kind == "pmap"
                                                                      else 1)
    # nothing ran: the states keep their values, the random stream did not advance
    np.testing.assert_array_equal(np.asarray(w.value), np.zeros((8, 256), np.float32))
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(rng.value)), key_before)
    info = transform.cache_info()
    assert (info.misses, info.hits) == (1, 0)  # lowered a cold signature: one miss
    traces = info.traces
    transform(x)
    info = transform.cache_info()
    assert (info.misses, info.hits, info.traces) == (1, 1, traces)  # the call reused the plan
    assert float(np.asarray(w.value).min()) != 0.0
    transform.lower(x)  # a warm signature: neither a miss nor a hit (no call ran)
    assert transform.cache_info()[:2] == (1, 1)


def test_lower_is_none_for_a_mapping_function_without_lower():
    w = statehost.ParamState(jnp.zeros((4,), jnp.float32))

    def plain_vmap(f, **options):
        mapped = jax.vmap(f, **options)
        return lambda *args: mapped(*args)  # a wrapper without .lower

    def lane(x):
        w.value = w.value + x
        return x

    filt = statehost.util.filter.OfType(statehost.ParamState)
    transform = statehost.transform.StatefulMapping(
        lane, in_axes=0, state_in_axes={0: filt}, state_out_axes={0: filt},
        mapping_fn=plain_vmap)
    assert transform.lower(jnp.ones(4, jnp.float32)) is None
    np.testing.assert_array_equal(np.asarray(w.value), np.zeros(4, np.float32))
