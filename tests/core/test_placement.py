"""Tests of ``statehost.transform._placement``: a placed transform keeps its type and runs
its calls through its placement, which never travels in a pickle."""

import cloudpickle
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.transform import Placement, StatefulFunction, StatefulMapping, jit, pmap, vmap
from statehost.transform._placement import place
from tests.core.models import PARAM, Affine


class Recorder:
    """A placement that records its calls and answers with a marker."""

    def __init__(self):
        self.calls = []

    def run(self, transform, args, kwargs):
        self.calls.append((transform, args, kwargs))
        return "ran elsewhere"

    def __repr__(self):
        return "Recorder()"


def _build(kind, model):
    options = dict(state_in_axes={0: PARAM}, state_out_axes={0: PARAM})
    if kind == "pmap":
        return pmap(model, axis_name="i", **options)
    if kind == "vmap":
        return vmap(model, **options)
    if kind == "StatefulMapping":
        return StatefulMapping(model, **options)
    return jit(model)


@pytest.mark.parametrize("kind", ["pmap", "vmap", "StatefulMapping", "jit"])
def test_a_placed_transform_keeps_its_type_and_hands_calls_to_the_placement(kind):
    model = Affine(2)
    transform = _build(kind, model)
    recorder = Recorder()

    placed = place(transform, recorder)
    out = placed(jnp.ones((2, 4)), scale=3)

    assert placed is transform
    assert type(placed) is (StatefulFunction if kind == "jit" else StatefulMapping)
    assert placed.placement is recorder
    assert isinstance(recorder, Placement)
    assert out == "ran elsewhere"
    [(seen, args, kwargs)] = recorder.calls
    assert seen is placed and kwargs == {"scale": 3}
    np.testing.assert_array_equal(args[0], jnp.ones((2, 4)))
    np.testing.assert_array_equal(model.weight.value, jnp.ones((2, 4)))  # nothing ran here
    assert placed.cache_info().misses == 0


def test_a_transform_runs_here_by_default_and_after_placing_it_back():
    model = Affine(2)
    step = vmap(model, state_in_axes={0: PARAM}, state_out_axes={0: PARAM})

    assert step.placement is None
    place(step, Recorder())
    place(step, None)
    step(jnp.ones((2, 4)))

    np.testing.assert_array_equal(model.weight.value, jnp.full((2, 4), 2.0))


@pytest.mark.parametrize("kind", ["pmap", "jit"])
def test_the_placement_is_not_pickled(kind):
    model = Affine(2)
    placed = place(_build(kind, model), Recorder())

    loaded = cloudpickle.loads(cloudpickle.dumps(placed))
    loaded(jnp.ones((2, 4)))

    assert loaded.placement is None
    assert cloudpickle.dumps(placed) == cloudpickle.dumps(place(placed, None))
    np.testing.assert_array_equal(loaded.origin_fun.weight.value, jnp.full((2, 4), 2.0))


def test_the_repr_names_the_placement():
    placed = place(jit(lambda x: x), Recorder())

    assert repr(placed).endswith(", placement=Recorder())")
    assert "placement=" not in repr(jit(lambda x: x))


def test_place_rejects_an_object_without_run():
    with pytest.raises(TypeError, match=r"must have a run\(transform, args, kwargs\) method; "
                                        r"got str"):
        place(jit(lambda x: x), "server")


def test_a_placed_transform_keeps_the_attributes_the_seed_prints():
    model = Affine(2)
    placed = place(pmap(model, axis_name="devices", state_in_axes={0: PARAM}), Recorder())

    assert placed.origin_fun is model
    assert placed.state_in_axes == {0: PARAM}
    assert type(placed).__module__ == "statehost.transform"
    assert isinstance(model.weight, statehost.ParamState)
