"""pmap / vmap / StatefulMapping: the state axis rules (issue semantics 1-3, 6, 7)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost import BatchAxisError
from statehost.transform import StatefulMapping, pmap, vmap
from statehost.util.filter import OfType, PathContains
from tests.core.models import MAPPINGS, PARAM, Affine

# -- 1. state_in_axes / state_out_axes -------------------------------------------


@pytest.mark.parametrize("transform", MAPPINGS)
@pytest.mark.parametrize("spec", [{0: PARAM}, PARAM, statehost.ParamState])
def test_state_in_axes_feeds_each_lane_its_slice_and_writes_back(transform, spec):
    model = Affine(8)
    f = transform(model, in_axes=0, state_in_axes=spec, state_out_axes={0: PARAM})
    delta = jnp.arange(32.0).reshape(8, 4)
    out = f(delta)
    np.testing.assert_array_equal(model.weight.value, 1 + np.arange(32.0).reshape(8, 4))
    np.testing.assert_array_equal(out, model.weight.value)


@pytest.mark.parametrize("transform", MAPPINGS)
def test_state_mapped_on_axis_1_is_written_back_on_axis_1(transform):
    w = statehost.ParamState(jnp.zeros((3, 8)))

    def f(x):
        assert w.value.shape == (3,)
        w.value = w.value + x
        return x.sum()

    g = transform(f, in_axes=0, state_in_axes={1: PARAM}, state_out_axes={1: PARAM})
    x = jnp.arange(24.0).reshape(8, 3)
    g(x)
    np.testing.assert_array_equal(w.value, np.arange(24.0).reshape(8, 3).T)


@pytest.mark.parametrize("transform", MAPPINGS)
def test_in_on_one_axis_out_on_another_raises_and_keeps_state(transform):
    model = Affine(8)
    f = transform(model, state_in_axes={0: PARAM}, state_out_axes={1: PARAM})
    with pytest.raises(BatchAxisError, match=r"mapped in on axis 0 .* out on axis 1"):
        f(jnp.ones((8, 4)))
    np.testing.assert_array_equal(model.weight.value, np.ones((8, 4)))


def test_state_in_axes_size_mismatch_names_the_state():
    model = Affine(3)
    f = vmap(model, state_in_axes=PARAM, state_out_axes=PARAM)
    with pytest.raises(BatchAxisError, match=r"ParamState .*weight.* has size 3"):
        f(jnp.ones((8, 4)))
    np.testing.assert_array_equal(model.weight.value, np.ones((3, 4)))


def test_state_in_axes_axis_out_of_range():
    s = statehost.ParamState(jnp.ones(4))
    f = vmap(lambda x: s.value * x, state_in_axes={1: PARAM})
    with pytest.raises(BatchAxisError, match=r"on axis 1, but its value has shape \(4,\)"):
        f(jnp.ones(4))


# -- 2. uniform writes are written back once --------------------------------------


@pytest.mark.parametrize("transform", MAPPINGS)
def test_write_that_does_not_vary_is_written_once_unbatched(transform):
    count = statehost.LongTermState(jnp.zeros(3))

    def f(x):
        count.value = count.value + 1.0
        return x * 2

    out = transform(f)(jnp.arange(8.0))
    np.testing.assert_array_equal(out, np.arange(8.0) * 2)
    np.testing.assert_array_equal(count.value, np.ones(3))


@pytest.mark.parametrize("transform", MAPPINGS)
def test_psum_result_is_uniform_and_written_once(transform):
    total = statehost.State(jnp.zeros(()))

    def f(x):
        total.value = jax.lax.psum(x, "i")
        return jax.lax.axis_index("i")

    idx = transform(f, axis_name="i")(jnp.arange(8.0))
    np.testing.assert_array_equal(idx, np.arange(8))
    assert total.value.shape == ()
    assert float(total.value) == 28.0


def test_declared_out_state_with_uniform_write_is_written_once():
    s = statehost.ParamState(jnp.zeros(2))

    def f(x):
        s.value = s.value + 1.0
        return x

    vmap(f, state_out_axes={0: PARAM})(jnp.ones(8))
    np.testing.assert_array_equal(s.value, np.ones(2))


def test_declared_unbatched_out_state_with_varying_write_raises():
    s = statehost.ParamState(jnp.zeros(()))

    def f(x):
        s.value = x
        return x

    with pytest.raises(BatchAxisError, match=r"declared unbatched"):
        vmap(f, state_out_axes={None: PARAM})(jnp.ones(8))
    assert float(s.value) == 0.0


# -- 3. undeclared writes that vary across lanes ----------------------------------


def _rmw(state):
    def f(x):
        state.value = state.value + x
        return x

    return f


def _write_only(state):
    def f(x):
        state.value = x * 2
        return x

    return f


@pytest.mark.parametrize("transform", MAPPINGS)
def test_raise_names_path_and_type(transform):
    class Outer(statehost.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = {"bias": statehost.ParamState(jnp.zeros(2))}

        def __call__(self, x):
            self.inner["bias"].value = self.inner["bias"].value + x
            return x

    model = Outer()
    f = transform(model, unexpected_out_state_mapping="raise")
    with pytest.raises(BatchAxisError, match=r"statehost\.ParamState at path inner/bias .*differs"):
        f(jnp.ones((8, 2)))
    np.testing.assert_array_equal(model.inner["bias"].value, np.zeros(2))


@pytest.mark.parametrize("transform", MAPPINGS)
def test_warn_stacks_on_axis_0_with_a_warning(transform):
    s = statehost.ShortTermState(jnp.zeros(()))
    with pytest.warns(UserWarning, match="unexpected_out_state_mapping='warn'"):
        transform(_write_only(s), unexpected_out_state_mapping="warn")(jnp.arange(8.0))
    np.testing.assert_array_equal(s.value, np.arange(8.0) * 2)


@pytest.mark.parametrize("transform", MAPPINGS)
def test_ignore_stacks_on_axis_0_silently(transform):
    s = statehost.ShortTermState(jnp.zeros(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transform(_rmw(s), unexpected_out_state_mapping="ignore")(jnp.ones((8, 4)))
    np.testing.assert_array_equal(s.value, np.ones((8, 4)))


@pytest.mark.parametrize("transform", MAPPINGS)
def test_auto_write_only_state_is_stacked_without_warning(transform):
    s = statehost.ShortTermState(jnp.zeros(()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transform(_write_only(s))(jnp.arange(8.0))
    np.testing.assert_array_equal(s.value, np.arange(8.0) * 2)


@pytest.mark.parametrize("transform", MAPPINGS)
def test_auto_per_lane_buffer_that_only_type_checks_per_lane(transform):
    s = statehost.ShortTermState(jnp.zeros((8, 3)))
    f = transform(_rmw(s))
    f(jnp.ones((8, 3)))
    f(jnp.ones((8, 3)))
    np.testing.assert_array_equal(s.value, np.full((8, 3), 2.0))


@pytest.mark.parametrize("transform", MAPPINGS)
def test_auto_read_write_with_lane_sized_leading_axis_is_per_lane(transform):
    s = statehost.ShortTermState(jnp.arange(8.0))
    f = transform(_rmw(s))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(jnp.ones(8))
        f(jnp.ones(8))
    np.testing.assert_array_equal(s.value, np.arange(8.0) + 2)


@pytest.mark.parametrize("transform", MAPPINGS)
def test_auto_read_write_other_size_is_stacked_once_with_one_warning(transform):
    s = statehost.ShortTermState(jnp.zeros(4))
    f = transform(_rmw(s))
    x = jnp.arange(32.0).reshape(8, 4)
    with pytest.warns(UserWarning, match=r"stacked on a new axis 0"):
        f(x)
    np.testing.assert_array_equal(s.value, np.arange(32.0).reshape(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(x)  # now per lane: no second warning, no new axis
    np.testing.assert_array_equal(s.value, 2 * np.arange(32.0).reshape(8, 4))


def test_undeclared_write_is_stacked_on_axis_0_whatever_jax_left():
    s = statehost.ShortTermState(jnp.zeros(3))
    x = jnp.arange(24.0).reshape(3, 8)
    vmap(_write_only(s), in_axes=1, out_axes=1)(x)
    np.testing.assert_array_equal(s.value, (2 * np.arange(24.0).reshape(3, 8)).T)


@pytest.mark.parametrize("transform", MAPPINGS)
def test_invalid_mode_raises_when_the_wrapper_is_built(transform):
    with pytest.raises(ValueError, match=r"must be one of 'auto', 'raise', 'warn', 'ignore'"):
        transform(lambda x: x, unexpected_out_state_mapping="sometimes")


# -- 6. pmap's own arguments ---------------------------------------------------------


def test_static_broadcasted_argnums_passes_a_python_value():
    @pmap(axis_name="i", in_axes=(0, None), static_broadcasted_argnums=(1,))
    def f(x, mode):
        return x * 2 if mode == "double" else x

    np.testing.assert_array_equal(f(jnp.arange(8.0), "double"), np.arange(8.0) * 2)
    np.testing.assert_array_equal(f(jnp.arange(8.0), "same"), np.arange(8.0))
    assert f.cache_info().misses == 2


def test_donate_argnums_donates_the_argument():
    f = pmap(lambda x: x + 1, donate_argnums=0)
    x = jax.pmap(lambda v: v)(jnp.arange(8.0))
    out = f(x)
    np.testing.assert_array_equal(out, np.arange(8.0) + 1)
    assert x.is_deleted()


def test_seed_custom_mapping_fn_with_donation():
    model = Affine(8)
    f = StatefulMapping(
        model,
        in_axes=0,
        out_axes=0,
        state_in_axes={0: PARAM},
        state_out_axes={0: PARAM},
        axis_name="devices",
        mapping_fn=lambda fun, *a, **kw: jax.pmap(fun, donate_argnums=(0,), *a, **kw),  # noqa: B026
    )
    f(jnp.ones((8, 4)))
    np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 2.0))


def test_pmap_axis_size_with_no_mapped_argument():
    f = pmap(lambda: jax.lax.axis_index("i") * 10, axis_name="i", axis_size=4)
    np.testing.assert_array_equal(f(), [0, 10, 20, 30])


def test_pmap_devices_sets_the_lane_count():
    devices = jax.devices()[:2]
    s = statehost.ParamState(jnp.zeros((2, 3)))

    def f(x):
        s.value = s.value + x
        return x

    pmap(f, devices=devices, state_in_axes=PARAM, state_out_axes=PARAM)(jnp.ones((2, 3)))
    np.testing.assert_array_equal(s.value, np.ones((2, 3)))


def test_more_lanes_than_devices_says_how_many_exist():
    f = pmap(lambda x: x)
    with pytest.raises(ValueError, match=r"maps 9 lanes, but this host has only 8 device"):
        f(jnp.ones(9))


def test_lanes_must_match_devices_list():
    f = pmap(lambda x: x, devices=jax.devices()[:2])
    with pytest.raises(ValueError, match=r"devices= lists 2 device"):
        f(jnp.ones(3))


# -- 7. path filters -----------------------------------------------------------------


class Encoder(statehost.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = statehost.ParamState(jnp.zeros((8, 2)))


class Net(statehost.nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.layers = [statehost.ParamState(jnp.ones(2))]

    def __call__(self, x):
        self.encoder.weight.value = self.encoder.weight.value + x
        return self.layers[0].value * x


@pytest.mark.parametrize("transform", MAPPINGS)
def test_path_contains_sees_the_attribute_path(transform):
    net = Net()
    spec = {0: PathContains("encoder")}
    out = transform(net, state_in_axes=spec, state_out_axes=spec)(jnp.ones((8, 2)))
    np.testing.assert_array_equal(net.encoder.weight.value, np.ones((8, 2)))
    np.testing.assert_array_equal(net.layers[0].value, np.ones(2))
    np.testing.assert_array_equal(out, np.ones((8, 2)))


def test_filter_on_list_of_states():
    a = statehost.State(jnp.zeros(8))
    b = statehost.State(jnp.zeros(8))

    def f(x):
        a.value = a.value + x
        return b.value

    out = vmap(f, state_in_axes={0: [a]}, state_out_axes={0: [a]})(jnp.ones(8))
    np.testing.assert_array_equal(a.value, np.ones(8))
    assert out.shape == (8, 8)  # b is broadcast: each lane sees all of it


# -- arguments, pytrees, collectives -------------------------------------------------


@pytest.mark.parametrize("transform", MAPPINGS)
def test_pytree_state_values_and_arguments(transform):
    s = statehost.HiddenState({"h": jnp.zeros((8, 2)), "c": jnp.zeros(8)})

    def f(inp):
        v = s.value
        s.value = {"h": v["h"] + inp["x"], "c": v["c"] + inp["y"]}
        return {"sum": inp["x"].sum() + inp["y"]}

    spec = {0: OfType(statehost.HiddenState)}
    out = transform(f, state_in_axes=spec, state_out_axes=spec)(
        {"x": jnp.ones((8, 2)), "y": jnp.arange(8.0)}
    )
    np.testing.assert_array_equal(s.value["h"], np.ones((8, 2)))
    np.testing.assert_array_equal(s.value["c"], np.arange(8.0))
    np.testing.assert_array_equal(out["sum"], 2 + np.arange(8.0))


def test_in_axes_tuple_with_none_and_keyword_arguments():
    def f(x, scale, *, shift):
        return x * scale + shift

    out = vmap(f, in_axes=(0, None))(jnp.arange(8.0), 2.0, shift=jnp.ones(8))
    np.testing.assert_array_equal(out, np.arange(8.0) * 2 + 1)


def test_inconsistent_mapped_sizes_name_the_arguments():
    f = vmap(lambda a, b: a + b)
    with pytest.raises(ValueError, match=r"argument 1 has size 3 but argument 0 has size 8"):
        f(jnp.ones(8), jnp.ones(3))


def test_in_axes_length_mismatch():
    f = vmap(lambda a, b: a + b, in_axes=(0,))
    with pytest.raises(ValueError, match=r"has 1 entries but the function was called with 2"):
        f(jnp.ones(8), jnp.ones(8))


def test_no_mapped_input_asks_for_axis_size():
    f = vmap(lambda x: x, in_axes=None)
    with pytest.raises(ValueError, match=r"cannot tell how many lanes.*axis_size"):
        f(jnp.ones(3))


def test_bad_state_axes_spec():
    with pytest.raises(TypeError, match=r"state_in_axes=\.\.\.\): the key 'x' is not an axis"):
        vmap(lambda x: x, state_in_axes={"x": PARAM})


def test_bad_in_axes_value():
    with pytest.raises(TypeError, match=r"axes must be ints or None"):
        pmap(lambda x: x, in_axes="rows")


def test_states_created_inside_stay_private():
    def f(x):
        tmp = statehost.State(x)
        tmp.value = tmp.value * 3
        return tmp.value

    np.testing.assert_array_equal(vmap(f)(jnp.arange(8.0)), np.arange(8.0) * 3)


def test_bound_method_of_a_module():
    model = Affine(8)
    f = vmap(model.__call__, state_in_axes=PATH_WEIGHT, state_out_axes=PATH_WEIGHT)
    f(jnp.ones((8, 4)))
    np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 2.0))


PATH_WEIGHT = {0: PathContains("weight")}


# -- the StatefulMapping object ------------------------------------------------------


def test_attributes_and_decorator_forms():
    model = Affine(8)
    f = pmap(model, "devices", in_axes=0, state_in_axes={0: PARAM}, state_out_axes={0: PARAM})
    assert isinstance(f, StatefulMapping)
    assert f.origin_fun is model
    assert f.state_in_axes == {0: PARAM} and f.state_out_axes == {0: PARAM}
    assert (f.in_axes, f.out_axes, f.axis_name, f.axis_size) == (0, 0, "devices", None)
    assert callable(f.mapping_fn)
    assert repr(f.state_in_axes) == "{0: OfType(<class 'statehost.ParamState'>)}"

    @vmap
    def g(x):
        return x + 1

    @vmap(in_axes=0, axis_name="k")
    def h(x):
        return jax.lax.psum(x, "k")

    @pmap
    def p(x):
        return x * 2

    assert isinstance(g, StatefulMapping) and g.__name__ == "g"
    np.testing.assert_array_equal(g(jnp.arange(3.0)), [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(h(jnp.arange(3.0)), [3.0, 3.0, 3.0])
    np.testing.assert_array_equal(p(jnp.arange(2.0)), [0.0, 2.0])
