"""Tests of ``statehost._state``: ``State``, its kinds, identity, pickling and repr."""

import pickle
import re
import uuid

import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost

KINDS = [
    statehost.State,
    statehost.ParamState,
    statehost.ShortTermState,
    statehost.LongTermState,
    statehost.HiddenState,
]
PICKLERS = [pickle, cloudpickle]


# ---------------------------------------------------------------------------
# Value, name, tag
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_value_get_and_set(kind):
    state = kind(jnp.zeros(3))
    np.testing.assert_array_equal(state.value, np.zeros(3, np.float32))

    state.value = state.value + jnp.arange(3.0)

    np.testing.assert_array_equal(state.value, np.array([0.0, 1.0, 2.0], np.float32))


def test_value_is_the_object_that_was_assigned():
    value = jnp.ones(2)
    state = statehost.ParamState(jnp.zeros(2))

    state.value = value

    assert state.value is value


def test_value_may_be_a_pytree():
    state = statehost.State({"a": jnp.zeros(2), "b": (jnp.ones(1), 3.0)})

    state.value = {"a": jnp.ones(2), "b": (jnp.zeros(1), 4.0)}

    np.testing.assert_array_equal(state.value["a"], np.ones(2, np.float32))
    np.testing.assert_array_equal(state.value["b"][0], np.zeros(1, np.float32))
    assert state.value["b"][1] == 4.0


@pytest.mark.parametrize("kind", KINDS)
def test_name_and_tag_default_to_none(kind):
    state = kind(jnp.zeros(1))

    assert state.name is None
    assert state.tag is None


@pytest.mark.parametrize("kind", KINDS)
def test_name_and_tag_are_kept(kind):
    state = kind(jnp.zeros(1), name="weight", tag="fast")

    assert state.name == "weight"
    assert state.tag == "fast"


def test_name_and_tag_are_keyword_only():
    with pytest.raises(TypeError):
        statehost.ParamState(jnp.zeros(1), "weight")  # type: ignore[misc]


@pytest.mark.parametrize("kind", [k for k in KINDS if k is not statehost.State])
def test_kinds_are_states(kind):
    state = kind(jnp.zeros(1))

    assert isinstance(state, statehost.State)
    assert type(state) is kind


def test_kinds_are_distinct_classes():
    assert len(set(KINDS)) == len(KINDS)
    assert not issubclass(statehost.ParamState, statehost.HiddenState)
    assert not issubclass(statehost.ShortTermState, statehost.LongTermState)


def test_states_have_no_instance_dict():
    # __slots__ keeps states small and stops typos from creating new attributes.
    state = statehost.ParamState(jnp.zeros(1))

    with pytest.raises(AttributeError):
        state.valeu = 1  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_id_is_a_uuid4_hex(kind):
    state = kind(jnp.zeros(1))

    parsed = uuid.UUID(hex=state.id)
    assert parsed.version == 4
    assert parsed.hex == state.id
    assert re.fullmatch(r"[0-9a-f]{32}", state.id)


def test_ids_are_unique():
    states = [statehost.ParamState(jnp.zeros(1)) for _ in range(100)]

    assert len({s.id for s in states}) == 100


def test_id_does_not_change_when_the_value_changes():
    state = statehost.ParamState(jnp.zeros(1))
    before = state.id

    state.value = jnp.ones(1)
    state.value = jnp.ones((5, 5))

    assert state.id == before


def test_id_is_read_only():
    state = statehost.ParamState(jnp.zeros(1))

    with pytest.raises(AttributeError):
        state.id = "0" * 32  # type: ignore[misc]


def test_states_compare_and_hash_by_identity():
    a = statehost.ParamState(jnp.zeros(1))
    b = statehost.ParamState(jnp.zeros(1))

    assert a == a
    assert a != b
    assert len({a, b, a}) == 2


# ---------------------------------------------------------------------------
# Pickling
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("pickler", PICKLERS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("kind", KINDS)
def test_pickle_round_trip_keeps_id_kind_value_name_and_tag(pickler, kind):
    state = kind(jnp.arange(4.0).reshape(2, 2), name="w", tag="t")

    restored = pickler.loads(pickler.dumps(state))

    assert restored is not state
    assert type(restored) is kind
    assert restored.id == state.id
    assert restored.name == "w"
    assert restored.tag == "t"
    np.testing.assert_array_equal(restored.value, np.arange(4.0, dtype=np.float32).reshape(2, 2))


@pytest.mark.parametrize("pickler", PICKLERS, ids=lambda m: m.__name__)
def test_pickle_round_trip_of_a_pytree_value(pickler):
    state = statehost.HiddenState({"h": jnp.ones(2), "c": [jnp.zeros(1), 7]})

    restored = pickler.loads(pickler.dumps(state))

    assert restored.id == state.id
    np.testing.assert_array_equal(restored.value["h"], np.ones(2, np.float32))
    np.testing.assert_array_equal(restored.value["c"][0], np.zeros(1, np.float32))
    assert restored.value["c"][1] == 7


@pytest.mark.parametrize("pickler", PICKLERS, ids=lambda m: m.__name__)
def test_pickle_keeps_sharing_inside_one_payload(pickler):
    state = statehost.ParamState(jnp.zeros(1))

    first, second = pickler.loads(pickler.dumps([state, state]))

    assert first is second
    assert first.id == state.id


def test_pickled_state_is_still_writable():
    state = statehost.ParamState(jnp.zeros(2))
    restored = cloudpickle.loads(cloudpickle.dumps(state))

    restored.value = jnp.ones(2)

    np.testing.assert_array_equal(restored.value, np.ones(2, np.float32))
    np.testing.assert_array_equal(state.value, np.zeros(2, np.float32))
    assert restored.write_count == 1


# ---------------------------------------------------------------------------
# write_count
# ---------------------------------------------------------------------------


def test_write_count_starts_at_zero_and_counts_assignments():
    state = statehost.ParamState(jnp.zeros(1))
    assert state.write_count == 0

    for expected in range(1, 4):
        state.value = jnp.full(1, float(expected))
        assert state.write_count == expected


def test_write_count_does_not_count_reads():
    state = statehost.ParamState(jnp.zeros(1))

    for _ in range(3):
        _ = state.value

    assert state.write_count == 0


def test_write_count_counts_writes_of_an_equal_value():
    state = statehost.ParamState(jnp.zeros(1))

    state.value = state.value
    state.value = state.value

    assert state.write_count == 2


def test_write_count_is_read_only():
    state = statehost.ParamState(jnp.zeros(1))

    with pytest.raises(AttributeError):
        state.write_count = 5  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Module path of the classes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_classes_live_in_the_statehost_namespace(kind):
    assert kind.__module__ == "statehost"
    assert type(kind(jnp.zeros(1))).__module__ == "statehost"
    assert getattr(statehost, kind.__qualname__) is kind


@pytest.mark.parametrize("kind", KINDS)
def test_class_repr_reads_statehost_dot_name(kind):
    assert repr(kind) == f"<class 'statehost.{kind.__name__}'>"


# ---------------------------------------------------------------------------
# repr
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_repr_shows_kind_shape_and_dtype_as_the_seed_does(kind):
    state = kind(jnp.arange(8.0).reshape(2, 4))

    assert repr(state) == f"{kind.__name__}(\n  value=ShapedArray(float32[2,4])\n)"


def test_repr_shows_name_and_tag():
    state = statehost.ParamState(jnp.zeros(2, jnp.int32), name="w", tag="slow")

    assert repr(state) == (
        "ParamState(\n  value=ShapedArray(int32[2]),\n  name='w',\n  tag='slow'\n)"
    )


@pytest.mark.parametrize("size", [1, 32, 33, 1000])
def test_repr_shows_no_values_whatever_the_size(size):
    state = statehost.State(jnp.full(size, 3, jnp.int32))

    assert repr(state) == f"State(\n  value=ShapedArray(int32[{size}])\n)"


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(jnp.float32, "float32"), (jnp.int32, "int32"), (jnp.bool_, "bool"), (jnp.uint8, "uint8")],
)
def test_repr_names_the_dtype(dtype, name):
    state = statehost.State(jnp.zeros((3, 1), dtype))

    assert f"ShapedArray({name}[3,1])" in repr(state)


def test_repr_of_a_scalar_array():
    state = statehost.State(jnp.asarray(2.5))

    assert repr(state) == "State(\n  value=ShapedArray(float32[])\n)"


def test_repr_of_a_python_scalar():
    state = statehost.State(3)

    assert repr(state) == "State(\n  value=3\n)"


def test_repr_of_a_pytree_value_describes_each_leaf():
    state = statehost.HiddenState({"a": jnp.zeros(2), "b": jnp.ones(40)})

    assert repr(state) == (
        "HiddenState(\n"
        "  value={a: ShapedArray(float32[2]), b: ShapedArray(float32[40])}\n"
        ")"
    )


def test_repr_of_a_raw_key_shows_its_uint32_shape():
    state = statehost.State(jax.random.PRNGKey(7))

    assert repr(state) == "State(\n  value=ShapedArray(uint32[2])\n)"


@pytest.mark.parametrize("shape", [(), (3,)])
def test_repr_of_a_typed_key_shows_the_key_dtype(shape):
    keys = jax.random.key(0) if shape == () else jax.random.split(jax.random.key(0), shape[0])
    state = statehost.State(keys)

    dims = ",".join(str(d) for d in shape)
    assert repr(state) == f"State(\n  value=ShapedArray(key<fry>[{dims}])\n)"


def test_repr_does_not_count_as_a_write():
    state = statehost.ParamState(jnp.zeros(1))

    repr(state)

    assert state.write_count == 0


# ---------------------------------------------------------------------------
# Tracers written outside statehost transforms
# ---------------------------------------------------------------------------


def _write_under_jit(state):
    @jax.jit
    def f(x):
        state.value = x * 2
        return x

    f(jnp.ones(3))


def _write_under_vmap(state):
    def f(x):
        state.value = x
        return x

    jax.vmap(f)(jnp.ones((4, 3)))


def _write_under_grad(state):
    def f(x):
        state.value = x
        return x

    jax.grad(f)(1.0)


def _write_under_make_jaxpr(state):
    def f(x):
        state.value = {"kept": jnp.zeros(3), "leaked": x}
        return x

    jax.make_jaxpr(f)(jnp.ones(3))


@pytest.mark.parametrize(
    "write",
    [_write_under_jit, _write_under_vmap, _write_under_grad, _write_under_make_jaxpr],
    ids=["jit", "vmap", "grad", "make_jaxpr-pytree"],
)
def test_writing_a_tracer_outside_statehost_transforms_raises(write):
    state = statehost.ParamState(jnp.zeros(3), name="w")

    with pytest.raises(statehost.StateTraceError, match=r"statehost\.transform\.jit") as info:
        write(state)

    assert "statehost.ParamState(name='w')" in str(info.value)
    assert "outside any statehost transform" in str(info.value)


def test_failed_tracer_write_leaves_the_state_unchanged():
    state = statehost.ParamState(jnp.arange(3.0))

    with pytest.raises(statehost.StateTraceError):
        _write_under_jit(state)

    np.testing.assert_array_equal(state.value, np.arange(3.0, dtype=np.float32))
    assert state.write_count == 0
    assert not isinstance(state.value, jax.core.Tracer)


def test_tracer_error_without_name_shows_the_kind():
    state = statehost.HiddenState(jnp.zeros(3))

    with pytest.raises(statehost.StateTraceError, match=r"^statehost\.HiddenState was written"):
        _write_under_jit(state)


def test_state_trace_error_is_a_statehost_runtime_error():
    assert issubclass(statehost.StateTraceError, statehost.StatehostError)
    assert issubclass(statehost.StateTraceError, RuntimeError)


def test_reading_a_state_inside_plain_jit_sees_its_current_value():
    state = statehost.ParamState(jnp.full(2, 5.0))

    @jax.jit
    def f(x):
        return x + state.value

    np.testing.assert_array_equal(f(jnp.ones(2)), np.full(2, 6.0, np.float32))
    assert state.write_count == 0


def test_writing_a_concrete_value_inside_plain_jit_is_allowed():
    # Only traced values are refused: a constant computed at trace time is concrete.
    state = statehost.ParamState(jnp.zeros(2))

    @jax.jit
    def f(x):
        state.value = np.ones(2, np.float32)
        return x

    f(jnp.ones(2))

    np.testing.assert_array_equal(state.value, np.ones(2, np.float32))
    assert state.write_count == 1


def test_deepcopy_is_a_new_state_with_a_new_id():
    import copy

    s = statehost.ParamState(jnp.ones(2), name="a", tag="t")
    twin = copy.deepcopy(s)
    assert type(twin) is statehost.ParamState
    assert twin.id != s.id and (twin.name, twin.tag) == ("a", "t")
    twin.value = jnp.zeros(2)
    np.testing.assert_array_equal(s.value, np.ones(2))
