"""The loop runner's per-loop placement of constant arguments (``server/loops.py``), and
loops whose arguments it must leave alone, through the real client and app."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.server.loops import _placed_once
from statehost.transform import jit, pmap, vmap
from tests.core.models import PARAM, Affine

LANES = 8


@pytest.fixture(autouse=True)
def _no_progress_bar(monkeypatch):
    monkeypatch.setenv("STATEHOST_PROGRESS", "0")


def _options():
    return dict(axis_name="i", state_in_axes={0: PARAM}, state_out_axes={0: PARAM})


def _delta():
    return np.arange(LANES * 4, dtype=np.float32).reshape(LANES, 4) / 10


def _local_loop(mapping, steps, *args, **kwargs):
    for _ in range(steps):
        out = mapping(*args, **kwargs)
    return out


# -- what is placed once, and what is left as it came --------------------------------
def test_a_pmaps_axis_0_arguments_are_sharded_over_the_lanes_once():
    delta, scale = _delta(), np.float32(2.0)
    (placed, kept), kwargs = _placed_once(pmap(Affine(LANES), in_axes=(0, None), **_options()),
                                          (delta, scale), {"bias": delta}, 2)
    assert isinstance(placed, jax.Array) and len(placed.sharding.device_set) == LANES
    np.testing.assert_array_equal(placed, delta)
    assert kept is scale  # broadcast (in_axes None): pmap places it
    assert isinstance(kwargs["bias"], jax.Array)  # pmap maps kwargs on axis 0


@pytest.mark.parametrize("make", [jit, vmap], ids=["jit", "vmap"])
def test_a_jit_or_vmaps_arrays_go_to_the_default_device_once(make):
    delta = _delta()
    (placed,), _ = _placed_once(make(lambda d: d), (delta,), {}, 1)
    assert isinstance(placed, jax.Array) and placed.devices() == {jax.devices()[0]}
    assert placed.dtype == delta.dtype and not placed.weak_type


@pytest.mark.parametrize("transform", [
    jit(lambda d: d, donate_argnums=0),
    jit(lambda d, n: d, static_argnums=1),
    pmap(lambda d: d, devices=jax.devices()[:LANES]),
    pmap(lambda d: d, in_axes=1),
    pmap(lambda d: d, donate_argnums=0),
], ids=["jit-donating", "jit-static", "pmap-on-devices", "pmap-axis-1", "pmap-donating"])
def test_arguments_a_transform_may_donate_or_place_itself_are_left_as_they_came(transform):
    delta = _delta()
    (arg, *_), _ = _placed_once(transform, (delta, 3), {}, 2 if "static" in repr(
        transform) else 1)
    assert arg is delta


def test_values_that_are_not_plain_arrays_are_left_as_they_came():
    # numpy scalars, Python numbers, float64 (not JAX's dtype without x64) and strings.
    odd = (np.float32(1.0), 2.5, np.zeros(3, np.float64), np.array(["a"]),
           [np.zeros(2, np.float32)])
    placed, _ = _placed_once(jit(lambda *a: a), odd, {}, len(odd))
    assert all(a is b for a, b in zip(placed[:4], odd[:4], strict=True))
    assert isinstance(placed[4][0], jax.Array)  # a list's arrays are arrays all the same


# -- loops with constant arguments compute what a local loop does --------------------
@pytest.mark.parametrize("kind", ["pmap", "vmap"])
def test_a_mapping_loop_with_constant_arrays_matches_the_local_loop(client, kind):
    make, remote_make = (pmap, client.pmap) if kind == "pmap" else (vmap, client.vmap)
    remote_model, local_model = Affine(LANES), Affine(LANES)

    out = client.loop(remote_make(remote_model, **_options()), 6, _delta())

    expected = _local_loop(make(local_model, **_options()), 6, _delta())
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(remote_model.weight.value, local_model.weight.value, rtol=1e-6)


def test_a_jit_loop_with_constant_arrays_and_kwargs_matches_the_local_loop(client):
    w = statehost.ParamState(jnp.zeros(4, jnp.float32))

    def step(x, *, scale):
        w.value = w.value * scale + x
        return w.value.sum()

    remote = client.jit(step)
    x, scale = np.arange(4, dtype=np.float32), np.full(4, 0.5, np.float32)
    out = client.loop(remote, 5, x, scale=scale, keep="all")

    value, expected = np.zeros(4, np.float32), []
    for _ in range(5):
        value = value * scale + x
        expected.append(value.sum())
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    np.testing.assert_allclose(w.value, value, rtol=1e-6)


def test_a_loop_that_donates_its_argument_runs_every_step(client):
    # A donated buffer is gone after the step that took it: placing the argument once
    # would hand the second step a deleted array.
    w = statehost.ParamState(jnp.zeros(4, jnp.float32))

    def step(x):
        w.value = w.value + x
        return x * 2

    out = client.loop(jit(step, donate_argnums=0), 3, np.ones(4, np.float32))
    np.testing.assert_array_equal(out, [2.0, 2.0, 2.0, 2.0])
    np.testing.assert_array_equal(w.value, [3.0, 3.0, 3.0, 3.0])
