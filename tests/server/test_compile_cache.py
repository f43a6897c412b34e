"""The compile cache: programs shared across sessions, and JAX's persistent cache on disk.

Every client here is a real ``statehost.connect`` session on the real app; two clients
are two sessions, as two users would be. The user functions count their traces with
:func:`count_trace`, which cloudpickle ships by reference, so the count is the server's.
"""

import collections
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.server import Settings, create_app
from statehost.server.testing import InProcessTransport
from statehost.util.filter import OfType
from tests.inprocess import TOKEN, URL, metric

LANES = 8
TRACES: collections.Counter = collections.Counter()


def count_trace(name):
    """Runs where the function is traced: on the server (shipped by reference)."""
    TRACES[name] += 1


def _connect(transport, **options):
    return statehost.connect(URL, token=TOKEN, transport=transport, dispatch="sync", **options)


def _compiles(client, source):
    return metric(client, "statehost_compiles_total", source=source)


def _server_transforms(app, session):
    """The transforms the server unpickled for ``session`` (one per shipped function)."""
    functions = app.state.runtime.functions
    return [entry.transform for key, entry in functions.items() if key.startswith(session)]


def _accumulate(client, start, width=4, name="accumulate"):
    """A pmap whose weight (its own ParamState per call of this factory) starts at ``start``."""
    weight = statehost.ParamState(jnp.full((LANES, width), start, dtype=jnp.float32))

    def step(delta):
        count_trace(name)
        weight.value = weight.value + delta
        return (weight.value * 2.0).sum(axis=-1)

    params = OfType(statehost.ParamState)
    return client.pmap(step, axis_name="i", in_axes=0, out_axes=0, state_in_axes={0: params},
                       state_out_axes={0: params}), weight


def test_a_second_session_runs_the_same_function_without_tracing_or_compiling(
        app, transport, client):
    first, first_weight = _accumulate(client, 1.0)
    np.testing.assert_array_equal(first(jnp.ones((LANES, 4))), np.full(LANES, 16.0))
    traces = TRACES["accumulate"]
    assert traces > 0 and _compiles(client, "fresh") == 1

    with _connect(transport) as other:
        second, second_weight = _accumulate(other, 10.0)
        out = second(jnp.ones((LANES, 4)))

        assert TRACES["accumulate"] == traces  # the user function did not run
        assert _compiles(client, "fresh") == 1 and _compiles(client, "shared") == 1
        [transform] = _server_transforms(app, other._session)
        info = transform.cache_info()
        assert (info.misses, info.shared, info.traces) == (0, 1, 0)
        # Its own states, not the first session's: 10 + 1, summed over 4, doubled.
        np.testing.assert_array_equal(out, np.full(LANES, 88.0))
        np.testing.assert_array_equal(second_weight.value, np.full((LANES, 4), 11.0))

        # Both keep running on their own values, from their own caches.
        np.testing.assert_array_equal(first(jnp.ones((LANES, 4))), np.full(LANES, 24.0))
        np.testing.assert_array_equal(second(jnp.ones((LANES, 4))), np.full(LANES, 96.0))
    np.testing.assert_array_equal(first_weight.value, np.full((LANES, 4), 3.0))
    assert _compiles(client, "fresh") == 1 and _compiles(client, "shared") == 1


def _record_compiled(client, monkeypatch):
    """``CallReply.compiled`` of each of ``client``'s calls, as the client receives it."""
    seen, committed = [], client._committed

    def record(reply, *rest):
        seen.append(reply.compiled)
        return committed(reply, *rest)

    monkeypatch.setattr(client, "_committed", record)
    return seen


def test_the_reply_says_a_shared_program_compiled_nothing(transport, client, monkeypatch):
    first, _ = _accumulate(client, 1.0, name="reply")
    first_compiled = _record_compiled(client, monkeypatch)
    first(jnp.ones((LANES, 4)))
    first(jnp.ones((LANES, 4)))
    with _connect(transport) as other:
        second_compiled = _record_compiled(other, monkeypatch)
        second, _ = _accumulate(other, 2.0, name="reply")
        second(jnp.ones((LANES, 4)))
        second(jnp.ones((LANES, 4), dtype=jnp.float32) * 2.0)
    assert first_compiled == [1, 0] and second_compiled == [0, 0]


def test_the_same_function_with_other_shapes_compiles_again(app, transport, client):
    first, _ = _accumulate(client, 1.0, name="shapes")
    first(jnp.ones((LANES, 4)))
    with _connect(transport) as other:
        wider, weight = _accumulate(other, 1.0, width=6, name="shapes")
        np.testing.assert_array_equal(wider(jnp.ones((LANES, 6))), np.full(LANES, 24.0))
        [transform] = _server_transforms(app, other._session)
        assert transform.cache_info().misses == 1 and transform.cache_info().shared == 0
    assert _compiles(client, "fresh") == 2 and _compiles(client, "shared") == 0


def _scale(client):
    return client.jit(lambda x, k: x * k, static_argnums=1)


def _built(client):
    """Programs traced on the server: compiled, or loaded from JAX's disk cache."""
    return _compiles(client, "fresh") + _compiles(client, "persistent")


def test_static_arguments_and_their_types_key_the_shared_program(transport, client):
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(_scale(client)(x, 2), [0.0, 2.0, 4.0])
    with _connect(transport) as other, _connect(transport) as third:
        np.testing.assert_array_equal(_scale(other)(x, 3), [0.0, 3.0, 6.0])
        assert _built(client) == 2 and _compiles(client, "shared") == 0
        np.testing.assert_array_equal(_scale(other)(x, 2), [0.0, 2.0, 4.0])
        assert _built(client) == 2 and _compiles(client, "shared") == 1
        # 2.0 == 2, but a float is another static argument: traced again. (Its XLA
        # program equals the one for 2, so JAX's persistent cache may already have it.)
        np.testing.assert_array_equal(_scale(third)(x, 2.0), [0.0, 2.0, 4.0])
        assert _built(client) == 3 and _compiles(client, "shared") == 1
        np.testing.assert_array_equal(_scale(third)(x.astype(jnp.int32), 2), [0, 2, 4])
        assert _built(client) == 4 and _compiles(client, "shared") == 1


def test_different_functions_never_share(transport, client):
    client.jit(lambda x: x + 1.0)(jnp.ones(3))
    with _connect(transport) as other:
        np.testing.assert_array_equal(other.jit(lambda x: x - 1.0)(jnp.ones(3)), np.zeros(3))
    assert _compiles(client, "fresh") == 2 and _compiles(client, "shared") == 0


def test_each_session_draws_from_its_own_default_stream_through_a_shared_program(
        transport, client):
    def draw(client):
        return client.jit(lambda: statehost.random.normal(size=(3,)))

    statehost.random.seed(1)
    first = np.asarray(draw(client)())
    with _connect(transport) as other:
        statehost.random.seed(2)
        second = np.asarray(draw(other)())
        assert _compiles(client, "shared") == 1
    statehost.random.seed(2)
    np.testing.assert_array_equal(second, statehost.random.normal(size=(3,)))
    assert not np.array_equal(first, second)


def test_a_function_that_captures_a_kept_array_is_not_shared(transport):
    def run(client, start):
        kept = client.jit(lambda x: x * 1.0)(jnp.full(3, start))  # stays on the server
        assert type(kept).__name__ == "RemoteArray"
        return np.asarray(client.jit(lambda y: y + kept)(jnp.zeros(3)))

    with statehost.connect(URL, token=TOKEN, transport=transport) as first, \
            statehost.connect(URL, token=TOKEN, transport=transport) as second:
        # Call ids are the client's choice: with the same ones, both sessions keep their
        # arrays under the same handle names, and both closures pickle to the same bytes.
        second._id_prefix, second._ids = first._id_prefix, itertools.count()
        first._ids = itertools.count()
        np.testing.assert_array_equal(run(first, 1.0), np.ones(3))
        np.testing.assert_array_equal(run(second, 5.0), np.full(3, 5.0))
        # x * 1.0 is shared; the closure over a kept array is compiled per session.
        assert _compiles(first, "shared") == 1 and _compiles(first, "fresh") == 3


# -- JAX's persistent compilation cache ------------------------------------------------
def _serve_once(data_dir, **settings):
    """Starts an app on ``data_dir``, runs one call and returns the compile counts."""
    app = create_app(Settings(tokens=(TOKEN,), data_dir=data_dir, **settings))
    transport = InProcessTransport(app)
    try:
        with _connect(transport) as client:
            step, _ = _accumulate(client, 1.0, name="restart")
            np.testing.assert_array_equal(step(jnp.ones((LANES, 4))), np.full(LANES, 16.0))
            return {s: _compiles(client, s) for s in ("fresh", "persistent", "shared")}
    finally:
        transport.shutdown()


def test_after_a_restart_the_program_comes_from_the_persistent_cache(tmp_path):
    assert _serve_once(tmp_path / "data") == {"fresh": 1, "persistent": 0, "shared": 0}
    assert any((tmp_path / "data" / "compile-cache").iterdir())
    assert _serve_once(tmp_path / "data") == {"fresh": 0, "persistent": 1, "shared": 0}


def test_compile_cache_off_keeps_nothing_on_disk(tmp_path):
    for _ in range(2):
        counts = _serve_once(tmp_path / "data", compile_cache=False)
        assert counts == {"fresh": 1, "persistent": 0, "shared": 0}
    assert not (tmp_path / "data" / "compile-cache").exists()


@pytest.mark.parametrize(("raw", "expected"), [("0", False), ("false", False), ("1", True)])
def test_compile_cache_setting_reads_the_environment(tmp_path, raw, expected):
    env = {"STATEHOST_COMPILE_CACHE": raw, "STATEHOST_DATA_DIR": str(tmp_path)}
    assert Settings.from_env(env).compile_cache is expected
    assert Settings.from_env({}).compile_cache is True


def test_a_bad_compile_cache_setting_says_what_to_fix():
    with pytest.raises(ValueError, match=r"STATEHOST_COMPILE_CACHE='maybe' is invalid "
                                         r"\(expected true or false\)"):
        Settings.from_env({"STATEHOST_COMPILE_CACHE": "maybe"})
