"""``ProgramCache`` and ``share_programs``: transforms of the same code share plans and programs.

These are local transforms (no server): the server does the same with one transform
per session. Traces are counted by ``cache_info().traces`` and by the functions.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.transform import ProgramCache, jit, pmap, vmap
from statehost.util.filter import OfType

LANES = 8
PARAMS = OfType(statehost.ParamState)


class Sources:
    """A ProgramObserver that writes down what it is told."""

    def __init__(self):
        self.events = []

    @contextlib.contextmanager
    def built(self):
        self.events.append("built")
        yield

    def adopted(self):
        self.events.append("adopted")


def _accumulator(cache, start, width=3, code="accumulate"):
    weight = statehost.ParamState(jnp.full((LANES, width), start, dtype=jnp.float32))
    traces = []

    def step(delta):
        traces.append(1)
        weight.value = weight.value + delta
        return (weight.value * 2.0).sum(axis=-1)

    f = pmap(step, axis_name="i", in_axes=0, state_in_axes={0: PARAMS},
             state_out_axes={0: PARAMS})
    f.share_programs(cache, code, [weight])
    return f, weight, traces


def test_a_second_transform_of_the_same_code_takes_the_program_on_its_own_states():
    sources = Sources()
    cache = ProgramCache(observer=sources)
    first, first_weight, first_traces = _accumulator(cache, 1.0)
    second, second_weight, second_traces = _accumulator(cache, 10.0)

    np.testing.assert_array_equal(first(jnp.ones((LANES, 3))), np.full(LANES, 12.0))
    np.testing.assert_array_equal(second(jnp.ones((LANES, 3))), np.full(LANES, 66.0))

    assert second_traces == [] and second.cache_info().traces == 0
    assert second.cache_info().misses == 0 and second.cache_info().shared == 1
    assert first.cache_info().misses == 1 and first.cache_info().shared == 0
    assert sources.events == ["built", "adopted"]
    np.testing.assert_array_equal(first_weight.value, np.full((LANES, 3), 2.0))
    np.testing.assert_array_equal(second_weight.value, np.full((LANES, 3), 11.0))
    np.testing.assert_array_equal(second(jnp.ones((LANES, 3))), np.full(LANES, 72.0))
    np.testing.assert_array_equal(first_weight.value, np.full((LANES, 3), 2.0))


def test_other_shapes_other_codes_and_unshared_transforms_build_their_own():
    cache = ProgramCache()
    first, _, _ = _accumulator(cache, 1.0)
    first(jnp.ones((LANES, 3)))
    wider, _, _ = _accumulator(cache, 1.0, width=5)
    other_code, _, _ = _accumulator(cache, 1.0, code="another")
    for f, width in ((wider, 5), (other_code, 3)):
        f(jnp.ones((LANES, width)))
        assert f.cache_info().misses == 1 and f.cache_info().shared == 0


def test_a_state_of_another_shape_builds_its_own_program_under_the_same_arguments():
    cache = ProgramCache()
    results = []
    for size in (2, 3, 2):
        w = statehost.State(jnp.ones(size))
        f = jit(lambda w=w: w.value * 2.0)
        f.share_programs(cache, "double-state", [w])
        results.append((f(), f.cache_info().shared))
    assert [r.shape for r, _ in results] == [(2,), (3,), (2,)]
    assert [shared for _, shared in results] == [0, 0, 1]


def test_states_are_matched_by_position_not_by_identity():
    cache = ProgramCache()

    def make(a_value):
        a, b = statehost.State(jnp.full(2, a_value)), statehost.State(jnp.zeros(2))

        def copy_double(x):
            b.value = a.value * 2.0 + x
            return b.value

        f = jit(copy_double)
        return f, a, b

    f1, a1, b1 = make(1.0)
    f2, a2, b2 = make(5.0)
    f1.share_programs(cache, "copy", [a1, b1])
    f2.share_programs(cache, "copy", [a2, b2, a2])  # repeats count once
    f1(jnp.ones(2))
    f2(jnp.ones(2))
    assert f2.cache_info().shared == 1
    np.testing.assert_array_equal(b1.value, [3.0, 3.0])
    np.testing.assert_array_equal(b2.value, [11.0, 11.0])
    np.testing.assert_array_equal(a2.value, [5.0, 5.0])


def test_a_plan_that_uses_a_state_missing_from_the_numbering_is_not_shared():
    cache = ProgramCache()
    hidden = statehost.State(jnp.ones(2))

    def make():
        f = jit(lambda x: hidden.value + x)
        f.share_programs(cache, "hidden", [])
        return f

    first, second = make(), make()
    first(jnp.ones(2))
    second(jnp.ones(2))
    assert len(cache) == 0 and second.cache_info().misses == 1


def test_code_none_shares_nothing_and_still_reports_what_it_built():
    sources = Sources()
    cache = ProgramCache(observer=sources)
    for _ in range(2):
        f = vmap(lambda x: x * 3.0)
        f.share_programs(cache, None, [])
        np.testing.assert_array_equal(f(jnp.arange(2.0)), [0.0, 3.0])
    assert len(cache) == 0 and sources.events == ["built", "built"]


def test_clear_caches_empties_the_program_cache_and_unpickling_forgets_sharing():
    import cloudpickle

    cache = ProgramCache()
    f = jit(lambda x: x + 1.0)
    f.share_programs(cache, "inc", [])
    f(jnp.ones(2))
    assert len(cache) == 1
    statehost.clear_caches()
    assert len(cache) == 0
    copy = cloudpickle.loads(cloudpickle.dumps(f))
    copy(jnp.ones(2))
    assert len(cache) == 0 and copy.cache_info().misses == 1


def test_the_cache_keeps_its_most_recent_keys():
    cache = ProgramCache(max_entries=2)
    for k in range(3):
        f = jit(lambda x: x * 2.0)
        f.share_programs(cache, f"code{k}", [])
        f(jnp.ones(2))
    assert len(cache) == 2
    again = jit(lambda x: x * 2.0)
    again.share_programs(cache, "code0", [])
    again(jnp.ones(2))
    assert again.cache_info().shared == 0


def test_program_cache_size_must_be_positive():
    with pytest.raises(ValueError, match=r"ProgramCache\(max_entries=0\): must be >= 1"):
        ProgramCache(max_entries=0)



@pytest.mark.parametrize("nested", [False, True])
def test_a_program_that_calls_back_into_python_is_not_shared(nested):
    """The callback is the tracing transform's own Python: shared, it would read that
    transform's state, whoever runs the program."""
    cache = ProgramCache()
    seen = []

    def make(value):
        w = statehost.State(jnp.full(2, value))

        def report(x):
            jax.debug.callback(lambda: seen.append(float(w.value[0])))
            return x + 1.0

        def step(x):
            if nested:
                return jax.lax.cond(x[0] > 0, report, lambda y: y, x)
            return report(x)

        f = jit(step)
        f.share_programs(cache, "report", [w])
        return f

    for value in (1.0, 2.0):
        make(value)(jnp.ones(2))
        jax.effects_barrier()
    assert seen == [1.0, 2.0] and len(cache) == 0
