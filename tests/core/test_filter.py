"""Tests of ``statehost.util.filter``: the filter classes and ``to_predicate``."""

import pickle

import cloudpickle
import jax.numpy as jnp
import pytest

import statehost
from statehost.util.filter import (
    All,
    Any,
    Everything,
    Filter,
    Not,
    Nothing,
    OfType,
    PathContains,
    WithTag,
    to_predicate,
)

PARAM = statehost.ParamState(jnp.zeros(1), tag="slow")
HIDDEN = statehost.HiddenState(jnp.zeros(1), tag="fast")
SHORT = statehost.ShortTermState(jnp.zeros(1))
PLAIN = statehost.State(jnp.zeros(1), tag="slow")

# (path, state) pairs every filter is checked against.
CASES = [
    (("encoder", "weight"), PARAM),
    (("encoder", "h"), HIDDEN),
    (("decoder", 0, "v"), SHORT),
    (("plain",), PLAIN),
]


def _selected(pred):
    return [pred(path, state) for path, state in CASES]


# ---------------------------------------------------------------------------
# The filter classes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filt", "expected"),
    [
        (OfType(statehost.ParamState), [True, False, False, False]),
        (OfType(statehost.HiddenState), [False, True, False, False]),
        (OfType(statehost.State), [True, True, True, True]),  # subclasses included
        (WithTag("slow"), [True, False, False, True]),
        (WithTag("fast"), [False, True, False, False]),
        (WithTag("other"), [False, False, False, False]),
        (PathContains("encoder"), [True, True, False, False]),
        (PathContains(0), [False, False, True, False]),
        (PathContains("enc"), [False, False, False, False]),  # whole components only
        (Any(OfType(statehost.ParamState), WithTag("fast")), [True, True, False, False]),
        (Any(), [False, False, False, False]),
        (All(PathContains("encoder"), WithTag("fast")), [False, True, False, False]),
        (All(), [True, True, True, True]),
        (Not(WithTag("slow")), [False, True, True, False]),
        (Not(Not(PathContains("decoder"))), [False, False, True, False]),
        (Everything(), [True, True, True, True]),
        (Nothing(), [False, False, False, False]),
    ],
    ids=repr,
)
def test_filter_selection(filt, expected):
    assert _selected(filt) == expected


def test_combinators_accept_shorthands():
    assert _selected(Any(statehost.HiddenState, "slow")) == [True, True, False, True]
    assert _selected(All(statehost.State, "slow", PathContains("plain"))) == [
        False,
        False,
        False,
        True,
    ]
    assert _selected(Not(statehost.ParamState)) == [False, True, True, True]
    assert Any(statehost.ParamState, "slow").filters == (
        OfType(statehost.ParamState),
        WithTag("slow"),
    )


def test_with_tag_on_an_object_without_tag_is_false():
    assert WithTag("slow")(("x",), object()) is False


def test_of_type_with_a_non_class_raises_type_error():
    with pytest.raises(TypeError, match=r"OfType\(type=\.\.\.\): expected a class, got 'slow'"):
        OfType("slow")  # type: ignore[arg-type]


def test_filter_base_class_is_abstract():
    with pytest.raises(NotImplementedError):
        Filter()(("x",), PARAM)


# ---------------------------------------------------------------------------
# Equality, hashing, pickling, repr
# ---------------------------------------------------------------------------


def _make_filters():
    """Fresh, equal-by-value instances of every filter kind."""
    return [
        OfType(statehost.ParamState),
        WithTag("slow"),
        PathContains("encoder"),
        PathContains(0),
        Any(OfType(statehost.ParamState), WithTag("fast")),
        All(PathContains("encoder"), "fast"),
        Not(WithTag("slow")),
        Everything(),
        Nothing(),
        to_predicate([PARAM, HIDDEN]),
    ]


@pytest.mark.parametrize("index", range(len(_make_filters())))
def test_filters_are_equal_and_hash_equal_by_value(index):
    first, second = _make_filters()[index], _make_filters()[index]

    assert first is not second
    assert first == second
    assert hash(first) == hash(second)
    assert len({first, second}) == 1


def test_different_filters_are_not_equal():
    filters = _make_filters()

    for i, a in enumerate(filters):
        for j, b in enumerate(filters):
            assert (a == b) is (i == j), (a, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (OfType(statehost.ParamState), OfType(statehost.HiddenState)),
        (WithTag("x"), PathContains("x")),  # same key, different kind
        (WithTag("x"), WithTag("y")),
        (Any(WithTag("x")), All(WithTag("x"))),
        (Any(WithTag("x"), WithTag("y")), Any(WithTag("x"))),
        (Everything(), Nothing()),
    ],
)
def test_filters_with_different_values_are_not_equal(a, b):
    assert a != b


def test_filters_can_be_dict_keys():
    table = {OfType(statehost.ParamState): "params", WithTag("fast"): "fast"}

    assert table[OfType(statehost.ParamState)] == "params"
    assert table[to_predicate("fast")] == "fast"


def test_filter_is_not_equal_to_other_objects():
    assert OfType(statehost.ParamState) != statehost.ParamState
    assert WithTag("slow") != "slow"


@pytest.mark.parametrize("pickler", [pickle, cloudpickle], ids=lambda m: m.__name__)
@pytest.mark.parametrize("index", range(len(_make_filters())))
def test_filters_survive_pickling(pickler, index):
    filt = _make_filters()[index]

    restored = pickler.loads(pickler.dumps(filt))

    assert restored is not filt
    assert type(restored) is type(filt)
    assert restored == filt
    assert hash(restored) == hash(filt)
    assert _selected(restored) == _selected(filt)


def test_state_identity_filter_matches_unpickled_states():
    # Identity is the state's id, so a shipped filter still selects the shipped states.
    payload = cloudpickle.dumps((to_predicate([PARAM]), PARAM, HIDDEN))

    filt, param, hidden = cloudpickle.loads(payload)

    assert filt(("w",), param) is True
    assert filt(("h",), hidden) is False


@pytest.mark.parametrize(
    ("filt", "text"),
    [
        (OfType(statehost.ParamState), "OfType(<class 'statehost.ParamState'>)"),
        (OfType(statehost.random.RandomState), "OfType(<class 'statehost.random.RandomState'>)"),
        (WithTag("slow"), "WithTag('slow')"),
        (PathContains("encoder"), "PathContains('encoder')"),
        (PathContains(0), "PathContains(0)"),
        (Not(WithTag("slow")), "Not(WithTag('slow'))"),
        (Everything(), "Everything()"),
        (Nothing(), "Nothing()"),
        (to_predicate([PARAM, HIDDEN]), "StateIs(2 states)"),
    ],
)
def test_filter_repr(filt, text):
    assert repr(filt) == text


def test_combinator_repr_shows_their_parts():
    text = repr(Any(OfType(statehost.ParamState), WithTag("fast")))

    assert text.startswith("Any(")
    assert "OfType(<class 'statehost.ParamState'>)" in text
    assert "WithTag('fast')" in text


# ---------------------------------------------------------------------------
# to_predicate
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (statehost.ParamState, OfType(statehost.ParamState)),
        (statehost.State, OfType(statehost.State)),
        ("slow", WithTag("slow")),
        (..., Everything()),
        (True, Everything()),
        (None, Nothing()),
        (False, Nothing()),
        ([statehost.ParamState], OfType(statehost.ParamState)),
        ((statehost.ParamState,), OfType(statehost.ParamState)),
        (["slow", statehost.HiddenState], Any(WithTag("slow"), OfType(statehost.HiddenState))),
        ({"fast"}, WithTag("fast")),
        ([], Any()),
    ],
    ids=[
        "class",
        "base-class",
        "tag",
        "ellipsis",
        "True",
        "None",
        "False",
        "list-of-one",
        "tuple-of-one",
        "list",
        "set",
        "empty-list",
    ],
)
def test_to_predicate_shorthands(value, expected):
    assert to_predicate(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (statehost.ParamState, [True, False, False, False]),
        ("slow", [True, False, False, True]),
        (..., [True, True, True, True]),
        (None, [False, False, False, False]),
        ([statehost.HiddenState, "slow"], [True, True, False, True]),
        ([], [False, False, False, False]),
    ],
)
def test_to_predicate_shorthands_select(value, expected):
    assert _selected(to_predicate(value)) == expected


@pytest.mark.parametrize(
    "filt", [OfType(statehost.ParamState), Everything(), Any(WithTag("x"))], ids=repr
)
def test_to_predicate_returns_filters_unchanged(filt):
    assert to_predicate(filt) is filt


def test_to_predicate_list_of_states_selects_by_identity():
    pred = to_predicate([PARAM, SHORT])

    assert _selected(pred) == [True, False, True, False]
    # Another state of the same kind, value and tag is not selected.
    twin = statehost.ParamState(jnp.zeros(1), tag="slow")
    assert pred(("encoder", "weight"), twin) is False


def test_to_predicate_single_state_selects_only_it():
    pred = to_predicate(HIDDEN)

    assert _selected(pred) == [False, True, False, False]


def test_to_predicate_list_mixing_states_and_filters():
    pred = to_predicate([PLAIN, OfType(statehost.HiddenState)])

    assert _selected(pred) == [False, True, False, True]


def test_to_predicate_keeps_a_user_callable():
    def pred(path, state):
        return "h" in path

    assert to_predicate(pred) is pred
    assert _selected(Any(pred)) == [False, True, False, False]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (3, r"3 \(type int\)"),
        (2.5, r"2\.5 \(type float\)"),
        (b"slow", r"b'slow' \(type bytes\)"),
        ({"a": statehost.ParamState}, r"\{'a': <class 'statehost\.ParamState'>\} \(type dict\)"),
    ],
)
def test_to_predicate_rejects_bad_input(value, shown):
    with pytest.raises(TypeError, match=rf"cannot use {shown} as a state filter"):
        to_predicate(value)


def test_to_predicate_bad_input_message_lists_the_fixes():
    with pytest.raises(TypeError) as info:
        to_predicate(3)

    message = str(info.value)
    assert message.startswith("statehost.util.filter: ")
    assert "statehost.ParamState" in message
    assert "PathContains('weight')" in message


@pytest.mark.parametrize(
    "build",
    [
        lambda: to_predicate([statehost.ParamState, 3]),
        lambda: Any("slow", 3),
        lambda: All(3),
        lambda: Not(3),
    ],
    ids=["list", "Any", "All", "Not"],
)
def test_bad_input_nested_in_a_filter_raises(build):
    with pytest.raises(TypeError, match=r"cannot use 3 \(type int\) as a state filter"):
        build()


def test_any_and_all_reprs_list_their_parts():
    from statehost.util.filter import All, Any, OfType

    assert repr(Any(OfType(statehost.ParamState), "x")) == (
        "Any(OfType(<class 'statehost.ParamState'>), WithTag('x'))"
    )
    assert repr(All("a", "b")) == "All(WithTag('a'), WithTag('b'))"
