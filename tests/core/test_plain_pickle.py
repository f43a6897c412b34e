"""The wire's fast path for plain data: the standard pickler, the same pickle as before."""

import pickle
from typing import NamedTuple

import numpy as np
import pytest

import statehost
from statehost.wire import StateRef, pack, unpack
from statehost.wire._pickle import _PLAIN_NODES, is_plain_data


class Pair(NamedTuple):
    a: int
    b: int


class Box(list):
    pass


PLAIN = [
    ((np.full((8, 4), 0.5, np.float32),), {}),
    ((np.arange(3), 2, 0.5, True, None, "s", b"b", 1j), {"lr": np.float32(0.1)}),
    ([{"x": np.zeros((2, 2)), 3: [np.int64(4)]}], {}),
    (np.zeros(0, np.dtype([("a", "f4"), ("b", "i2")])),),  # a structured dtype holds no objects
]

NOT_PLAIN = {
    "a State": lambda: (statehost.ParamState(np.ones(2)),),
    "a function": lambda: ((lambda x: x),),
    "an object array": lambda: (np.array([object()]),),
    "a NamedTuple": lambda: (Pair(1, 2),),
    "a list subclass": lambda: (Box([1]),),
    "a set": lambda: ({1, 2},),
    "a larger tree": lambda: (tuple(range(_PLAIN_NODES)),),
}


@pytest.mark.parametrize("obj", PLAIN)
def test_plain_data_takes_the_standard_pickler_and_round_trips(obj):
    assert is_plain_data(obj)
    section = pack(obj)
    assert section.states == []
    out = section.load(lambda ref: pytest.fail(f"no reference expected, got {ref}"))
    flat_in, flat_out = _leaves(obj), _leaves(out)
    assert [type(x) for x in flat_out] == [type(x) for x in flat_in]
    for want, got in zip(flat_in, flat_out, strict=True):
        if isinstance(want, np.ndarray | np.generic):
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        else:
            assert got == want


def test_plain_arrays_still_travel_out_of_band():
    big = np.arange(100_000, dtype=np.float32)
    section = pack(((big,), {}))
    assert [b.nbytes for b in section.buffers] == [big.nbytes]
    assert len(section.payload) < 500
    assert len(pack(((big,), {}), oob=False).buffers) == 0


@pytest.mark.parametrize("what", sorted(NOT_PLAIN))
def test_anything_else_goes_through_cloudpickle_as_before(what):
    obj = NOT_PLAIN[what]()
    assert not is_plain_data(obj)
    section = pack(obj)
    refs: list[StateRef] = []
    out = unpack([memoryview(section.payload), *section.buffers],
                 lambda ref: refs.append(ref) or "resident")
    if what == "a State":  # replaced by a reference, never pickled whole
        assert section.states == [obj[0]] and [r.id for r in refs] == [obj[0].id]
        assert out == ("resident",)
    elif what == "a function":
        assert out[0](3) == 3
    else:
        assert type(out[0]) is type(obj[0])


def test_the_fast_path_writes_what_the_server_reads_like_any_pickle():
    """The receiver's unpickler takes the standard pickler's output unchanged (same
    protocol, buffers in order)."""
    obj = ((np.ones((2, 3), np.float32), np.arange(4)), {"k": 1})
    section = pack(obj)
    direct = pickle.loads(section.payload, buffers=section.buffers)
    np.testing.assert_array_equal(direct[0][0], obj[0][0])
    np.testing.assert_array_equal(direct[0][1], obj[0][1])
    assert direct[1] == {"k": 1}


def _leaves(tree):
    if type(tree) in (tuple, list):
        return [x for item in tree for x in _leaves(item)]
    if type(tree) is dict:
        return [x for k, v in tree.items() for x in (*_leaves(k), *_leaves(v))]
    return [tree]
