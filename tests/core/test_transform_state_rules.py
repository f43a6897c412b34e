"""Random streams, all-or-nothing commits, caching, pickling, jit and nesting
(issue semantics 4, 5, 8, 9)."""

import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost import BatchAxisError, StateTraceError
from statehost.transform import jit, pmap, vmap
from statehost.util.filter import OfType
from tests.core.models import MAPPINGS, PARAM, Affine


def _affine_map(transform, model):
    return transform(model, state_in_axes={0: PARAM}, state_out_axes={0: PARAM})


# -- 4. random -----------------------------------------------------------------------


@pytest.mark.parametrize("transform", MAPPINGS)
def test_each_lane_gets_its_own_key_and_the_stream_advances_once(transform):
    rs = statehost.random.RandomState(7)
    before = rs.value

    def draw(scale):
        return rs.normal(0.0, scale)

    out = np.asarray(transform(draw)(jnp.ones(8)))
    assert len(set(out.tolist())) == 8
    keys = jax.random.split(before, 9)
    np.testing.assert_array_equal(rs.value, keys[0])
    # each lane draws as RandomState.normal does: split its key once, draw with the second half
    expected = [float(jax.random.normal(jax.random.split(k)[1], ())) for k in keys[1:]]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


@pytest.mark.parametrize("transform", MAPPINGS)
def test_reseeding_reproduces_the_draws_and_calls_never_repeat(transform):
    spec = {0: OfType(statehost.random.RandomState)}
    f = transform(lambda s: statehost.random.uniform(0.0, s), state_in_axes=spec,
                  state_out_axes=spec)
    statehost.random.seed(3)
    a, b = np.asarray(f(jnp.ones(8))), np.asarray(f(jnp.ones(8)))
    statehost.random.seed(3)
    c = np.asarray(f(jnp.ones(8)))
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, b)


# -- 5. all-or-nothing ---------------------------------------------------------------


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize("transform", [*MAPPINGS, jit])
def test_user_exception_keeps_its_class_and_every_state(transform):
    a = statehost.ParamState(jnp.zeros(8))
    rs = statehost.random.RandomState(0)
    key = rs.value

    def f(x):
        a.value = a.value + x
        rs.normal()
        raise Boom("no")

    g = transform(f) if transform is jit else transform(f, state_in_axes=PARAM,
                                                       state_out_axes=PARAM)
    with pytest.raises(Boom, match="no"):
        g(jnp.ones(8))
    np.testing.assert_array_equal(a.value, np.zeros(8))
    np.testing.assert_array_equal(rs.value, key)


@pytest.mark.parametrize("transform", MAPPINGS)
def test_shape_error_leaves_states_unchanged(transform):
    a = statehost.ParamState(jnp.zeros((8, 2)))

    def f(x):
        a.value = a.value + x  # (2,) + (3,)
        return x

    with pytest.raises(TypeError, match="add got incompatible shapes"):
        transform(f, state_in_axes=PARAM, state_out_axes=PARAM)(jnp.ones((8, 3)))
    np.testing.assert_array_equal(a.value, np.zeros((8, 2)))


def test_axis_error_after_other_writes_leaves_every_state_unchanged():
    ok = statehost.ParamState(jnp.zeros(8))
    bad = statehost.ShortTermState(jnp.zeros(()))

    def f(x):
        ok.value = ok.value + x
        bad.value = x
        return x

    g = vmap(f, state_in_axes=PARAM, state_out_axes=PARAM, unexpected_out_state_mapping="raise")
    with pytest.raises(BatchAxisError):
        g(jnp.ones(8))
    np.testing.assert_array_equal(ok.value, np.zeros(8))
    assert float(bad.value) == 0.0


# -- 8. caching ----------------------------------------------------------------------


@pytest.mark.parametrize("transform", MAPPINGS)
def test_cold_call_traces_twice_and_warm_calls_run_no_python(transform):
    model = Affine(8)
    calls = []
    original = model.__call__

    class Counting(statehost.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def __call__(self, x):
            calls.append(1)
            return original(x)

    f = _affine_map(transform, Counting())
    f(jnp.ones((8, 4)))
    assert len(calls) <= 2
    assert f.cache_info().traces == len(calls)
    cold = len(calls)
    for _ in range(5):
        f(jnp.ones((8, 4)))
    assert len(calls) == cold
    info = f.cache_info()
    assert (info.hits, info.misses, info.entries) == (5, 1, 1)
    np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 7.0))


def test_new_argument_shape_is_a_miss_then_cached():
    f = vmap(lambda x: x * 2)
    f(jnp.ones(8))
    f(jnp.ones(4))
    f(jnp.ones(4))
    f(jnp.ones(4, dtype=jnp.int32))
    info = f.cache_info()
    assert (info.hits, info.misses, info.entries) == (1, 3, 3)


def test_changed_state_shape_is_a_miss():
    s = statehost.State(jnp.zeros(3))
    f = jit(lambda: s.value.sum())
    f()
    s.value = jnp.zeros(5)
    assert float(f()) == 0.0
    assert f.cache_info().misses == 2


def test_clear_caches_forgets_compiled_functions():
    f = vmap(lambda x: x + 1)
    f(jnp.ones(2))
    statehost.clear_caches()
    assert f.cache_info().entries == 0
    f(jnp.ones(2))
    assert f.cache_info().misses == 2


# -- 9. cloudpickle ------------------------------------------------------------------


@pytest.mark.parametrize("transform", MAPPINGS)
def test_mapping_survives_cloudpickle(transform):
    model = Affine(8)
    f = _affine_map(transform, model)
    f(jnp.ones((8, 4)))
    g = cloudpickle.loads(cloudpickle.dumps(f))
    assert g.origin_fun.weight.id == model.weight.id
    assert g.origin_fun.weight is not model.weight
    g(jnp.ones((8, 4)))
    np.testing.assert_array_equal(g.origin_fun.weight.value, np.full((8, 4), 3.0))
    np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 2.0))
    assert g.cache_info().misses == 1


def test_pmap_with_devices_survives_cloudpickle():
    f = pmap(lambda x: x + 1, devices=jax.devices()[:2])
    g = cloudpickle.loads(cloudpickle.dumps(f))
    assert g.mapping_fn.devices == jax.devices()[:2]
    np.testing.assert_array_equal(g(jnp.zeros(2)), [1.0, 1.0])


# -- jit and nesting -------------------------------------------------------------------


def test_jit_reads_writes_and_commits():
    count = statehost.State(jnp.zeros(()))
    rs = statehost.random.RandomState(1)

    @jit
    def tick(n):
        count.value = count.value + n
        return rs.uniform()

    a = tick(1.0)
    b = tick(2.0)
    assert float(count.value) == 3.0
    assert float(a) != float(b)
    assert tick.cache_info().traces == 2


def test_jit_static_and_donated_arguments():
    @jit(static_argnums=1, donate_argnums=0)
    def f(x, times):
        for _ in range(times):
            x = x * 2
        return x

    x = jnp.ones(3)
    np.testing.assert_array_equal(f(x, 3), np.full(3, 8.0))
    assert x.is_deleted()
    with pytest.raises(TypeError, match="is not hashable"):
        f(jnp.ones(3), [3])


def test_jit_of_vmap_updates_state_and_stays_cached():
    model = Affine(8)
    step = jit(_affine_map(vmap, model))
    for _ in range(3):
        step(jnp.ones((8, 4)))
    np.testing.assert_array_equal(model.weight.value, np.full((8, 4), 4.0))
    assert step.cache_info().misses == 1 and step.cache_info().hits == 2


def test_vmap_of_vmap_with_random():
    rs = statehost.random.RandomState(0)
    inner = vmap(lambda x: x + rs.normal())
    out = vmap(inner)(jnp.zeros((3, 4)))
    assert out.shape == (3, 4)
    assert len(set(np.asarray(out).ravel().tolist())) == 12


def test_writing_a_tracer_outside_a_statehost_transform_is_refused():
    s = statehost.State(jnp.zeros(()))

    def f(x):
        s.value = x
        return x

    with pytest.raises(StateTraceError, match=r"statehost\.transform\.jit"):
        jax.jit(f)(1.0)
    assert float(s.value) == 0.0


# -- errors of the call protocol ---------------------------------------------------------


@pytest.mark.parametrize(("second_trace", "verb"), [("read", "read"), ("write", "wrote")])
def test_states_touched_only_on_the_compile_trace_are_reported(second_trace, verb):
    s = statehost.State(jnp.zeros(()))
    runs = []

    def f(x):
        runs.append(1)
        if len(runs) == 2:
            if second_trace == "read":
                return x + s.value
            s.value = x
        return x

    with pytest.raises(StateTraceError, match=rf"{verb} statehost\.State when it was traced"):
        jit(f)(1.0)
    assert float(s.value) == 0.0


def test_static_and_donated_argument_clash():
    with pytest.raises(ValueError, match=r"both in static_argnums and donate_argnums"):
        jit(lambda x: x, static_argnums=0, donate_argnums=0)
    with pytest.raises(ValueError, match=r"both in static_broadcasted_argnums and donate_argnums"):
        pmap(lambda x: x, static_broadcasted_argnums=0, donate_argnums=(0,))


def test_static_argnum_past_the_arguments():
    f = jit(lambda x, n=1: x * n, static_argnums=1)
    with pytest.raises(ValueError, match=r"static argument number 1 was given but .* only 1"):
        f(jnp.ones(2))


def test_non_callable_is_rejected():
    with pytest.raises(TypeError, match=r"expected a callable"):
        vmap(3)
