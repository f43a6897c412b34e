"""Tests of ``statehost.nn.Module``: the state tree, ``states(filter)``, repr, pickling."""

import pickle

import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.nn import Module
from statehost.nn._module import state_paths
from statehost.transform import pmap
from statehost.util.filter import All, Not, OfType, PathContains, WithTag


class Affine(Module):
    def __init__(self, size):
        super().__init__()
        self.weight = statehost.ParamState(jnp.ones((size,)))

    def __call__(self, delta):
        self.weight.value = self.weight.value + delta
        return self.weight.value


class Cell(Module):
    def __init__(self):
        super().__init__()
        self.w = statehost.ParamState(jnp.zeros((2, 2)), tag="slow")
        self.h = statehost.HiddenState(jnp.zeros(2), tag="fast")
        self.size = 2  # not a state: ignored


class Net(Module):
    """Every place a state may sit: direct, sub-module, list, tuple, dict, nested."""

    def __init__(self):
        super().__init__()
        self.bias = statehost.ParamState(jnp.zeros(3), name="bias")
        self.encoder = Cell()
        self.layers = [Cell(), statehost.ShortTermState(jnp.ones(1))]
        self.pair = (statehost.LongTermState(jnp.zeros(1)), {"deep": [Cell()]})
        self.table = {"mem": statehost.LongTermState(jnp.ones(4), tag="fast"), 3: Cell()}
        self.note = "not a state"
        self.scale = jnp.ones(5)  # an array attribute that is not a State


NET_PATHS = [
    ("bias",),
    ("encoder", "w"),
    ("encoder", "h"),
    ("layers", 0, "w"),
    ("layers", 0, "h"),
    ("layers", 1),
    ("pair", 0),
    ("pair", 1, "deep", 0, "w"),
    ("pair", 1, "deep", 0, "h"),
    ("table", "mem"),
    ("table", 3, "w"),
    ("table", 3, "h"),
]


def _ids(states):
    return {path: state.id for path, state in states.items()}


# ---------------------------------------------------------------------------
# states()
# ---------------------------------------------------------------------------


def test_states_of_a_module_with_direct_states():
    model = Affine(4)

    found = model.states()

    assert type(found) is dict
    assert list(found) == [("weight",)]
    assert found[("weight",)] is model.weight


def test_states_walks_sub_modules_and_containers_in_attribute_order():
    net = Net()

    found = net.states()

    assert list(found) == NET_PATHS
    assert found[("bias",)] is net.bias
    assert found[("encoder", "w")] is net.encoder.w
    assert found[("layers", 0, "h")] is net.layers[0].h
    assert found[("layers", 1)] is net.layers[1]
    assert found[("pair", 0)] is net.pair[0]
    assert found[("pair", 1, "deep", 0, "w")] is net.pair[1]["deep"][0].w
    assert found[("table", "mem")] is net.table["mem"]
    assert found[("table", 3, "h")] is net.table[3].h


def test_states_ignores_non_state_attributes():
    net = Net()

    found = net.states()

    assert all(isinstance(state, statehost.State) for state in found.values())
    assert not any("note" in path or "scale" in path or "size" in path for path in found)


def test_states_of_an_empty_module():
    assert Module().states() == {}


def test_states_of_a_module_without_super_init():
    class Bare(Module):
        def __init__(self):
            self.x = statehost.State(jnp.zeros(1))

    bare = Bare()

    assert bare.states() == {("x",): bare.x}


def test_a_shared_state_appears_once_under_its_first_path():
    net = Affine(2)
    net.alias = net.weight
    net.more = [net.weight]

    found = net.states()

    assert list(found) == [("weight",)]


def test_a_shared_sub_module_is_walked_once():
    cell = Cell()
    net = Module()
    net.a = cell
    net.b = [cell]

    assert list(net.states()) == [("a", "w"), ("a", "h")]


def test_cycles_between_modules_terminate():
    parent = Affine(2)
    child = Cell()
    parent.child = child
    child.parent = parent

    assert list(parent.states()) == [("weight",), ("child", "w"), ("child", "h")]
    assert list(child.states()) == [("w",), ("h",), ("parent", "weight")]


def test_states_added_after_construction_are_found():
    model = Affine(2)
    model.extra = statehost.HiddenState(jnp.zeros(1))

    assert list(model.states()) == [("weight",), ("extra",)]


def test_states_sees_the_current_state_objects():
    model = Affine(2)
    replacement = statehost.ParamState(jnp.zeros(2))
    model.weight = replacement

    assert model.states()[("weight",)] is replacement


# ---------------------------------------------------------------------------
# states(filter)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ((OfType(statehost.ParamState),), [p for p in NET_PATHS if p[-1] in ("w", "bias")]),
        ((statehost.ParamState,), [p for p in NET_PATHS if p[-1] in ("w", "bias")]),
        ((OfType(statehost.LongTermState),), [("pair", 0), ("table", "mem")]),
        ((PathContains("encoder"),), [("encoder", "w"), ("encoder", "h")]),
        (
            (PathContains(0),),
            [
                ("layers", 0, "w"),
                ("layers", 0, "h"),
                ("pair", 0),
                ("pair", 1, "deep", 0, "w"),
                ("pair", 1, "deep", 0, "h"),
            ],
        ),
        ((PathContains("deep"),), [("pair", 1, "deep", 0, "w"), ("pair", 1, "deep", 0, "h")]),
        (("fast",), [p for p in NET_PATHS if p[-1] == "h"] + [("table", "mem")]),
        ((WithTag("slow"),), [p for p in NET_PATHS if p[-1] == "w"]),
        ((WithTag("missing"),), []),
        ((...,), NET_PATHS),
        ((None,), []),
        (
            (OfType(statehost.ShortTermState), PathContains("bias")),
            [("bias",), ("layers", 1)],
        ),
        (
            (All(OfType(statehost.HiddenState), PathContains("table")),),
            [("table", 3, "h")],
        ),
        (
            (Not(OfType(statehost.ParamState)),),
            [p for p in NET_PATHS if p[-1] not in ("w", "bias")],
        ),
    ],
    ids=[
        "OfType-Param",
        "class-Param",
        "OfType-LongTerm",
        "PathContains-str",
        "PathContains-int",
        "PathContains-nested",
        "tag-string",
        "WithTag",
        "WithTag-missing",
        "ellipsis",
        "None",
        "two-filters-any",
        "All",
        "Not",
    ],
)
def test_states_with_filters(filters, expected):
    net = Net()

    found = net.states(*filters)

    # Order is kept: the filtered dict is the full dict with entries removed.
    assert list(found) == [p for p in NET_PATHS if p in expected]
    full = net.states()
    assert all(found[path] is full[path] for path in found)


def test_states_with_a_list_of_state_instances_selects_by_identity():
    net = Net()

    found = net.states([net.bias, net.table["mem"]])

    assert list(found) == [("bias",), ("table", "mem")]


def test_states_with_a_user_predicate():
    net = Net()

    found = net.states(lambda path, state: state.value.shape == (4,))

    assert list(found) == [("table", "mem")]


def test_states_with_a_bad_filter_raises_type_error():
    with pytest.raises(TypeError, match=r"cannot use 3\.5 \(type float\) as a state filter"):
        Net().states(3.5)


# ---------------------------------------------------------------------------
# state_paths (what transforms use)
# ---------------------------------------------------------------------------


def test_state_paths_of_a_bound_method_walks_its_module():
    model = Affine(3)

    assert state_paths(model.__call__) == {model.weight: ("weight",)}


def test_state_paths_of_a_container():
    a = Affine(1)
    loose = statehost.State(jnp.zeros(1))

    assert state_paths({"model": a, "x": [loose]}) == {
        a.weight: ("model", "weight"),
        loose: ("x", 0),
    }


@pytest.mark.parametrize("root", [len, 3, "text", jnp.ones(2), lambda x: x])
def test_state_paths_of_things_without_states_is_empty(root):
    assert state_paths(root) == {}


# ---------------------------------------------------------------------------
# repr
# ---------------------------------------------------------------------------


def test_repr_of_a_module_with_a_direct_state():
    model = Affine(4)

    assert repr(model) == (
        "Affine(\n"
        "  weight=ParamState(\n"
        "    value=ShapedArray(float32[4])\n"
        "  )\n"
        ")"
    )


def test_repr_of_a_nested_module_with_containers():
    net = Module()
    net.cell = Cell()
    net.items = [statehost.ShortTermState(jnp.ones(1, jnp.int32)), 5]
    net.table = {"k": statehost.LongTermState(jnp.zeros((50, 2)), name="big")}
    net.size = 3

    assert repr(net) == (
        "Module(\n"
        "  cell=Cell(\n"
        "    w=ParamState(\n"
        "      value=ShapedArray(float32[2,2]),\n"
        "      tag='slow'\n"
        "    ),\n"
        "    h=HiddenState(\n"
        "      value=ShapedArray(float32[2]),\n"
        "      tag='fast'\n"
        "    )\n"
        "  ),\n"
        "  items=[\n"
        "    ShortTermState(\n"
        "      value=ShapedArray(int32[1])\n"
        "    ),\n"
        "    5\n"
        "  ],\n"
        "  table={\n"
        "    'k': LongTermState(\n"
        "      value=ShapedArray(float32[50,2]),\n"
        "      name='big'\n"
        "    )\n"
        "  }\n"
        ")"
    )


def test_repr_of_a_module_without_states():
    model = Module()
    model.x = 3

    assert repr(model) == "Module()"


def test_repr_is_the_seeds_text_after_a_pmap():
    """The seed's cell 8 prints the cell-4 model after its pairwise update like this."""
    model = Affine(2)
    step = pmap(model, axis_name="pair", devices=jax.devices()[:2],
                state_in_axes={0: OfType(statehost.ParamState)},
                state_out_axes={0: OfType(statehost.ParamState)})
    step(jnp.stack([jnp.ones((4,)), -jnp.ones((4,))], axis=0))

    assert repr(model) == (
        "Affine(\n  weight=ParamState(\n    value=ShapedArray(float32[2,4])\n  )\n)"
    )


def test_repr_follows_the_current_shape():
    model = Affine(2)
    model.weight.value = jnp.zeros((3, 5), jnp.int32)

    assert "value=ShapedArray(int32[3,5])" in repr(model)


def test_repr_of_a_module_cycle_terminates():
    parent = Affine(1)
    parent.child = Module()
    parent.child.parent = parent

    text = repr(parent)

    assert text.endswith("  child=Module(\n    parent=Affine(...)\n  )\n)")


def test_module_class_lives_in_statehost_nn():
    assert Module.__module__ == "statehost.nn"
    assert repr(Module) == "<class 'statehost.nn.Module'>"


# ---------------------------------------------------------------------------
# Pickling
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("pickler", [pickle, cloudpickle], ids=lambda m: m.__name__)
def test_module_pickle_round_trip_keeps_paths_ids_and_values(pickler):
    net = Net()
    net.bias.value = jnp.arange(3.0)

    restored = pickler.loads(pickler.dumps(net))

    assert type(restored) is Net
    assert list(restored.states()) == NET_PATHS
    assert _ids(restored.states()) == _ids(net.states())
    for path, state in restored.states().items():
        assert type(state) is type(net.states()[path])
        assert state is not net.states()[path]
    np.testing.assert_array_equal(restored.bias.value, np.arange(3.0, dtype=np.float32))
    assert restored.bias.name == "bias"
    assert restored.table["mem"].tag == "fast"
    assert restored.note == "not a state"


def test_module_cloudpickle_keeps_shared_states_shared():
    model = Affine(2)
    model.alias = model.weight

    restored = cloudpickle.loads(cloudpickle.dumps(model))

    assert restored.alias is restored.weight
    assert restored.weight.id == model.weight.id


def test_module_cloudpickle_of_a_class_defined_in_a_function():
    # A notebook's model class has no importable module: cloudpickle ships it by value.
    class Local(Module):
        def __init__(self):
            super().__init__()
            self.w = statehost.ParamState(jnp.full(2, 4.0))

        def __call__(self, x):
            return self.w.value * x

    model = Local()

    restored = cloudpickle.loads(cloudpickle.dumps(model))

    assert restored.w.id == model.w.id
    assert isinstance(restored, Module)
    np.testing.assert_array_equal(restored(jnp.ones(2)), np.full(2, 4.0, np.float32))


def test_unpickled_module_still_works():
    model = cloudpickle.loads(cloudpickle.dumps(Affine(2)))

    out = model(jnp.array([1.0, -1.0]))

    np.testing.assert_array_equal(out, np.array([2.0, 0.0], np.float32))
    np.testing.assert_array_equal(model.weight.value, np.array([2.0, 0.0], np.float32))
