"""Tests of ``statehost.random``: ``RandomState``, the default stream and the draws."""

import os
import subprocess
import sys

import cloudpickle
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost import random as sr
from statehost.random import RandomState


@pytest.fixture
def default_stream():
    """``statehost.random.DEFAULT``, restored to its key (and so its draws) afterwards."""
    saved = sr.DEFAULT.value
    yield sr.DEFAULT
    sr.DEFAULT.value = saved


def _key(seed):
    return np.asarray(jax.random.PRNGKey(seed))


# Each draw as (name, args, kwargs, reference): the reference computes the
# expected draw from the subkey the draw must use.
DRAWS = [
    (
        "normal",
        (),
        {"size": 5},
        lambda k: jax.random.normal(k, (5,)),
    ),
    (
        "normal",
        (2.0, 3.0),
        {"size": (2, 3)},
        lambda k: jax.random.normal(k, (2, 3)) * 3.0 + 2.0,
    ),
    (
        "normal",
        (jnp.zeros(4), 1.0),
        {},
        lambda k: jax.random.normal(k, (4,)),
    ),
    (
        "uniform",
        (),
        {"size": 6},
        lambda k: jax.random.uniform(k, (6,)),
    ),
    (
        "uniform",
        (-2.0, 2.0),
        {"size": (3,)},
        lambda k: jax.random.uniform(k, (3,)) * 4.0 - 2.0,
    ),
    (
        "randint",
        (10,),
        {"size": 7},
        lambda k: jax.random.randint(k, (7,), 0, 10, jnp.int32),
    ),
    (
        "randint",
        (5, 9),
        {"size": (2, 2)},
        lambda k: jax.random.randint(k, (2, 2), 5, 9, jnp.int32),
    ),
    (
        "bernoulli",
        (0.3,),
        {"size": 8},
        lambda k: jax.random.bernoulli(k, 0.3, (8,)),
    ),
    (
        "permutation",
        (6,),
        {},
        lambda k: jax.random.permutation(k, 6),
    ),
    (
        "permutation",
        (jnp.arange(12.0).reshape(2, 6),),
        {"axis": 1},
        lambda k: jax.random.permutation(k, jnp.arange(12.0).reshape(2, 6), axis=1),
    ),
    (
        "choice",
        (10,),
        {"size": 4},
        lambda k: jax.random.choice(k, 10, (4,)),
    ),
    (
        "choice",
        (jnp.arange(5.0),),
        {"size": 3, "replace": False},
        lambda k: jax.random.choice(k, jnp.arange(5.0), (3,), replace=False),
    ),
    (
        "choice",
        (3,),
        {"p": jnp.array([0.0, 0.0, 1.0])},
        lambda k: jax.random.choice(k, 3, (), p=jnp.array([0.0, 0.0, 1.0])),
    ),
]
DRAW_IDS = [f"{name}-{i}" for i, (name, *_rest) in enumerate(DRAWS)]


# ---------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 42, 2**31, 2**32 - 1, np.uint32(7), np.int64(123)])
def test_seed_gives_the_key_of_jax_prngkey(seed):
    state = RandomState(seed)

    assert state.value.dtype == np.uint32
    np.testing.assert_array_equal(np.asarray(state.value), _key(int(seed)))


@pytest.mark.parametrize("seed", [-1, -(2**31)])
def test_negative_seed_gives_the_key_of_jax_prngkey(seed):
    np.testing.assert_array_equal(np.asarray(RandomState(seed).value), _key(seed))


def test_key_arrays_are_accepted_as_is():
    raw = jax.random.PRNGKey(5)
    typed = jax.random.key(5)

    np.testing.assert_array_equal(np.asarray(RandomState(raw).value), _key(5))
    np.testing.assert_array_equal(RandomState(np.asarray(raw)).value, _key(5))
    assert RandomState(typed).value is typed


def test_typed_key_draws_match_jax():
    state = RandomState(jax.random.key(3))

    draw = state.normal(size=4)

    _, sub = jax.random.split(jax.random.key(3))
    np.testing.assert_array_equal(draw, jax.random.normal(sub, (4,)))


def test_none_seed_gives_fresh_streams():
    a, b = RandomState(), RandomState(None)

    assert a.value.shape == (2,)
    assert not np.array_equal(np.asarray(a.value), np.asarray(b.value))


@pytest.mark.parametrize(
    ("bad", "shown"),
    [
        (1.5, r"shape \(\) and dtype float64"),
        ("seed", r"shape \(\) and dtype <U4"),
        (np.zeros(3, np.uint32), r"shape \(3,\) and dtype uint32"),
        (np.zeros(2, np.int32), r"shape \(2,\) and dtype int32"),
        (jnp.zeros((2, 2), jnp.uint32), r"shape \(2, 2\) and dtype uint32"),
    ],
)
def test_bad_seed_or_key_raises_value_error(bad, shown):
    with pytest.raises(ValueError, match=rf"RandomState\(seed_or_key=\.\.\.\): .*{shown}"):
        RandomState(bad)


def test_bad_seed_message_shows_the_fix():
    with pytest.raises(ValueError, match=r"Fix: pass an int, e\.g\. RandomState\(0\)"):
        RandomState(np.zeros(3, np.uint32))


def test_bad_key_passed_to_seed_raises_and_keeps_the_stream():
    state = RandomState(4)

    with pytest.raises(ValueError, match=r"expected an int seed or a key"):
        state.seed(np.zeros(5, np.uint32))

    np.testing.assert_array_equal(np.asarray(state.value), _key(4))


def test_random_state_is_a_state():
    state = RandomState(0, name="rng")

    assert isinstance(state, statehost.State)
    assert state.name == "rng"
    assert RandomState.__module__ == "statehost.random"
    assert repr(RandomState) == "<class 'statehost.random.RandomState'>"


def test_random_state_repr():
    assert repr(RandomState(9)) == "RandomState(\n  value=ShapedArray(uint32[2])\n)"


def test_random_state_survives_cloudpickle():
    state = RandomState(11)
    state.normal()

    restored = cloudpickle.loads(cloudpickle.dumps(state))

    assert type(restored) is RandomState
    assert restored.id == state.id
    np.testing.assert_array_equal(restored.normal(size=3), state.normal(size=3))


# ---------------------------------------------------------------------------
# Draws on a RandomState
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "args", "kwargs", "reference"), DRAWS, ids=DRAW_IDS)
def test_method_draw_uses_a_split_of_the_key_and_advances_it(name, args, kwargs, reference):
    state = RandomState(0)
    key = state.value
    expected_key, subkey = jax.random.split(key)
    writes = state.write_count

    draw = getattr(state, name)(*args, **kwargs)

    np.testing.assert_array_equal(draw, reference(subkey))
    assert draw.shape == reference(subkey).shape
    assert draw.dtype == reference(subkey).dtype
    np.testing.assert_array_equal(np.asarray(state.value), np.asarray(expected_key))
    assert not np.array_equal(np.asarray(state.value), np.asarray(key))
    assert state.write_count == writes + 1


@pytest.mark.parametrize(("name", "args", "kwargs", "reference"), DRAWS, ids=DRAW_IDS)
def test_successive_method_draws_differ_and_reseeding_reproduces_them(
    name, args, kwargs, reference
):
    state = RandomState(3)
    draw = getattr(state, name)

    first = [np.asarray(draw(*args, **kwargs)) for _ in range(4)]
    state.seed(3)
    second = [np.asarray(draw(*args, **kwargs)) for _ in range(4)]

    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    if name != "choice" or "p" not in kwargs:  # a one-hot p always draws the same value
        assert any(not np.array_equal(first[0], later) for later in first[1:])


@pytest.mark.parametrize(
    ("name", "args", "check"),
    [
        ("normal", (5.0, 0.0), lambda x: np.all(x == 5.0)),
        ("uniform", (2.0, 3.0), lambda x: np.all((x >= 2.0) & (x < 3.0))),
        ("randint", (4, 6), lambda x: set(np.unique(x)) <= {4, 5}),
        ("bernoulli", (0.0,), lambda x: not np.any(x)),
        ("bernoulli", (1.0,), lambda x: np.all(x)),
    ],
)
def test_draws_respect_their_parameters(name, args, check):
    draw = getattr(RandomState(0), name)(*args, size=1000)

    assert draw.shape == (1000,)
    assert check(np.asarray(draw))


def test_permutation_is_a_permutation():
    draw = RandomState(0).permutation(50)

    assert sorted(np.asarray(draw).tolist()) == list(range(50))


def test_choice_without_replacement_has_no_repeats():
    draw = RandomState(0).choice(20, size=20, replace=False)

    assert sorted(np.asarray(draw).tolist()) == list(range(20))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_normal_and_uniform_dtype(dtype):
    state = RandomState(0)

    assert state.normal(size=2, dtype=dtype).dtype == dtype
    assert state.uniform(size=2, dtype=dtype).dtype == dtype


def test_scalar_draws_by_default():
    state = RandomState(0)

    assert state.normal().shape == ()
    assert state.uniform().shape == ()
    assert state.randint(3).shape == ()
    assert state.bernoulli().shape == ()
    assert state.choice(3).shape == ()


def test_split_key_returns_one_fresh_key_and_advances():
    state = RandomState(0)
    expected_key, expected_sub = jax.random.split(state.value)

    sub = state.split_key()

    np.testing.assert_array_equal(sub, expected_sub)
    np.testing.assert_array_equal(state.value, expected_key)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_split_key_n_returns_n_keys_and_advances(n):
    state = RandomState(0)
    expected = jax.random.split(state.value, n + 1)

    keys = state.split_key(n)

    assert keys.shape == (n, 2)
    np.testing.assert_array_equal(keys, expected[1:])
    np.testing.assert_array_equal(state.value, expected[0])


def test_seed_resets_the_stream():
    state = RandomState(0)
    state.normal(size=3)

    state.seed(8)

    np.testing.assert_array_equal(np.asarray(state.value), _key(8))


def test_streams_with_different_seeds_differ():
    assert not np.array_equal(RandomState(0).normal(size=4), RandomState(1).normal(size=4))


def test_streams_do_not_share_state():
    a, b = RandomState(0), RandomState(0)

    a.normal(size=3)

    np.testing.assert_array_equal(np.asarray(b.value), _key(0))


# ---------------------------------------------------------------------------
# Module-level draws on statehost.random.DEFAULT
# ---------------------------------------------------------------------------


def test_default_is_a_named_random_state():
    assert isinstance(sr.DEFAULT, RandomState)
    assert sr.DEFAULT.name == "statehost.random.DEFAULT"


@pytest.mark.parametrize(("name", "args", "kwargs", "reference"), DRAWS, ids=DRAW_IDS)
def test_module_draw_uses_the_default_stream(default_stream, name, args, kwargs, reference):
    sr.seed(21)
    expected_key, subkey = jax.random.split(jax.random.PRNGKey(21))

    draw = getattr(sr, name)(*args, **kwargs)

    np.testing.assert_array_equal(draw, reference(subkey))
    np.testing.assert_array_equal(np.asarray(default_stream.value), np.asarray(expected_key))


@pytest.mark.parametrize(("name", "args", "kwargs", "reference"), DRAWS, ids=DRAW_IDS)
def test_module_draw_equals_method_draw_on_an_equal_stream(
    default_stream, name, args, kwargs, reference
):
    sr.seed(5)
    own = RandomState(5)

    for _ in range(3):
        np.testing.assert_array_equal(
            getattr(sr, name)(*args, **kwargs), getattr(own, name)(*args, **kwargs)
        )
    np.testing.assert_array_equal(np.asarray(default_stream.value), np.asarray(own.value))


def test_module_reseeding_reproduces_draws(default_stream):
    sr.seed(2)
    first = [sr.normal(size=3), sr.uniform(size=2), sr.randint(9, size=4)]
    sr.seed(2)
    second = [sr.normal(size=3), sr.uniform(size=2), sr.randint(9, size=4)]

    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], sr.normal(size=3))


def test_module_split_key(default_stream):
    sr.seed(0)
    expected = jax.random.split(jax.random.PRNGKey(0), 4)

    keys = sr.split_key(3)

    np.testing.assert_array_equal(keys, expected[1:])
    np.testing.assert_array_equal(default_stream.value, expected[0])
    next_key, next_sub = jax.random.split(expected[0])
    np.testing.assert_array_equal(sr.split_key(), next_sub)
    np.testing.assert_array_equal(default_stream.value, next_key)


def test_module_seed_with_a_bad_key_raises(default_stream):
    with pytest.raises(ValueError, match=r"RandomState\(seed_or_key=\.\.\.\)"):
        sr.seed(np.zeros(4, np.uint32))


# ---------------------------------------------------------------------------
# Import side effects
# ---------------------------------------------------------------------------


def test_importing_statehost_does_not_initialise_a_jax_backend():
    # DEFAULT is made at import: it must not start a backend, or the user's
    # jax.config.update('jax_num_cpu_devices', ...) would come too late.
    code = (
        "import statehost\n"
        "import jax\n"
        "jax.config.update('jax_num_cpu_devices', 3)\n"
        "print(jax.device_count())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["JAX_PLATFORMS"] = "cpu"

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "3"
