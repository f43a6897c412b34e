"""Remote calls through the real client and app: same results as local, state sync, caching."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
import statehost.client
from statehost.transform import StatefulFunction, StatefulMapping, jit, pmap, vmap
from tests.core.models import PARAM, Affine
from tests.inprocess import metric

LANES = 8


def _aval(x):
    """Shape, dtype and weak type (``jax.typeof`` also compares shardings)."""
    return x.shape, x.dtype, x.weak_type


def _pmap_options():
    return dict(axis_name="i", in_axes=0, out_axes=0, state_in_axes={0: PARAM},
                state_out_axes={0: PARAM})


def test_pmap_matches_local_and_updates_local_state(client):
    remote_model, local_model = Affine(LANES), Affine(LANES)
    remote = client.pmap(remote_model, **_pmap_options())
    local = pmap(local_model, **_pmap_options())
    for k in range(3):
        delta = jnp.arange(LANES * 4.0).reshape(LANES, 4) * (k + 1)
        out, expected = remote(delta), local(delta)
        assert isinstance(out, jax.Array) and _aval(out) == _aval(expected)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(remote_model.weight.value, local_model.weight.value)
    assert isinstance(remote_model.weight.value, jax.Array)


def _remote_transform(client, kind, model):
    options = dict(state_in_axes={0: PARAM}, state_out_axes={0: PARAM})
    if kind == "pmap":
        return client.pmap(model, axis_name="i", **options)
    if kind == "pmap decorator":
        return client.pmap(axis_name="i", pull=False, **options)(model)
    if kind == "vmap":
        return client.vmap(model, **options)
    if kind == "StatefulMapping":
        return client.StatefulMapping(model, axis_name="i", mapping_fn=jax.pmap, **options)
    return client.jit(model, retries=2)


@pytest.mark.parametrize("kind", ["pmap", "pmap decorator", "vmap", "StatefulMapping", "jit"])
def test_client_transforms_are_the_local_types_placed_on_the_server(client, kind):
    model = Affine(LANES)

    remote = _remote_transform(client, kind, model)

    expected = StatefulFunction if kind == "jit" else StatefulMapping
    assert type(remote) is expected and isinstance(remote, expected)
    assert isinstance(remote.placement, statehost.client.RemotePlacement)
    assert remote.placement.client is client
    assert remote.placement.pull is (kind != "pmap decorator")
    assert remote.placement.retries == (2 if kind == "jit" else 0)
    assert remote.origin_fun is model
    assert repr(remote).endswith(f", placement=RemotePlacement({client.url!r}, "
                                 f"pull={remote.placement.pull}))")
    remote(jnp.ones((LANES, 4)))
    client.pull(model)
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 2.0))
    assert remote.cache_info().misses == 0  # it ran on the server, not here


def test_code_written_for_local_mappings_accepts_remote_ones(client):
    def describe(mapping: StatefulMapping) -> str:
        if not isinstance(mapping, StatefulMapping):
            raise TypeError("expected a StatefulMapping")
        return f"{mapping.axis_name}: {sorted(mapping.state_in_axes)}"

    remote = client.pmap(Affine(LANES), axis_name="devices", state_in_axes={0: PARAM})

    assert describe(remote) == "devices: [0]"


@pytest.mark.parametrize("kind", ["pmap", "jit"])
def test_outputs_print_and_behave_like_the_local_call_outputs(client, kind):
    """The seed's cell 5 prints ``Array([...], dtype=float32, weak_type=True)``: a Python
    float in, a weakly typed array out; remotely the same, not a numpy array."""

    def scale(x, s):
        return {"weak": s * 2.0, "strong": x * s, "ints": jnp.ones((2,), jnp.int32)}

    if kind == "pmap":
        remote = client.pmap(scale, in_axes=(0, None))
        local = pmap(scale, in_axes=(0, None))
    else:
        remote, local = client.jit(scale), jit(scale)
    x = jnp.arange(LANES, dtype=jnp.float32)

    got, expected = remote(x, 0.5), local(x, 0.5)

    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    assert expected["weak"].weak_type and not expected["strong"].weak_type
    for name in expected:
        assert type(got[name]) is type(expected[name]), name
        assert _aval(got[name]) == _aval(expected[name]), name
        assert repr(got[name]) == repr(expected[name]), name
        assert bool((got[name] == expected[name]).all())
    with jax.numpy_dtype_promotion("standard"):
        half = jnp.ones((), jnp.bfloat16)
        assert (got["weak"] + half).dtype == (expected["weak"] + half).dtype == jnp.bfloat16


@pytest.mark.parametrize("kind", ["pmap", "vmap", "jit"])
def test_decorator_forms_match_local(client, kind):
    counter = statehost.ShortTermState(jnp.zeros(()))

    def body(x, scale):
        counter.value = counter.value + 1
        return x * scale

    if kind == "jit":
        remote = client.jit(static_argnums=1)(body)
        local = jit(body, static_argnums=1)
    else:
        factory = {"pmap": pmap, "vmap": vmap}[kind]
        remote = getattr(client, kind)(in_axes=(0, None))(body)
        local = factory(body, in_axes=(0, None))
    x = jnp.arange(LANES, dtype=jnp.float32)
    np.testing.assert_allclose(remote(x, 3.0), local(x, 3.0))
    assert float(counter.value) == 2.0  # one remote call, pulled back, then one local call


def test_stateful_mapping_with_custom_mapping_fn(client):
    model = Affine(LANES)
    mapping = client.StatefulMapping(
        model, in_axes=0, out_axes=0, state_in_axes={0: PARAM}, state_out_axes={0: PARAM},
        axis_name="devices",
        mapping_fn=lambda fun, **kw: jax.pmap(fun, donate_argnums=(0,), **kw),
    )
    mapping(jnp.ones((LANES, 4)))
    mapping(jnp.ones((LANES, 4)))
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 3.0))
    assert mapping.origin_fun is model
    assert 0 in mapping.state_in_axes


def test_devices_handles_work_as_pmap_devices(client):
    devices = client.devices()
    assert len(devices) == LANES
    assert {d.platform for d in devices} == {"cpu"}
    model = Affine(2)
    step = client.pmap(model, devices=devices[:2], **_pmap_options())
    step(jnp.stack([jnp.ones(4), -jnp.ones(4)]))
    np.testing.assert_array_equal(model.weight.value, [[2.0] * 4, [0.0] * 4])


def test_repeat_calls_move_no_state_and_compile_nothing(client):
    model = Affine(LANES)
    step = client.pmap(model, **_pmap_options())
    step(jnp.ones((LANES, 4)))
    state_in = metric(client, "statehost_wire_bytes_total", direction="in", part="state")
    function_in = metric(client, "statehost_wire_bytes_total", direction="in", part="function")
    compiles = metric(client, "statehost_compiles_total")
    assert state_in > 0 and function_in > 0 and compiles == 1
    for _ in range(10):
        step(jnp.ones((LANES, 4)))
    assert metric(client, "statehost_wire_bytes_total", direction="in", part="state") == state_in
    assert metric(client, "statehost_wire_bytes_total", direction="in",
                  part="function") == function_in
    assert metric(client, "statehost_compiles_total") == compiles
    assert metric(client, "statehost_function_cache_total", result="hit") == 10
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 12.0))


def test_a_local_write_is_uploaded_once(client):
    model = Affine(LANES)
    step = client.pmap(model, **_pmap_options())
    step(jnp.zeros((LANES, 4)))
    before = metric(client, "statehost_wire_bytes_total", direction="in", part="state")
    model.weight.value = jnp.full((LANES, 4), 10.0)
    step(jnp.zeros((LANES, 4)))
    uploaded = metric(client, "statehost_wire_bytes_total", direction="in", part="state")
    assert uploaded - before >= LANES * 4 * 4
    step(jnp.zeros((LANES, 4)))
    assert metric(client, "statehost_wire_bytes_total", direction="in", part="state") == uploaded
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 10.0))


def test_pull_false_leaves_values_remote_until_pull(client):
    model = Affine(LANES)
    step = client.pmap(model, pull=False, **_pmap_options())
    for _ in range(3):
        step(jnp.ones((LANES, 4)))
    np.testing.assert_array_equal(model.weight.value, np.ones((LANES, 4)))  # stale here
    client.pull(model)
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 4.0))
    # A pull=True call after pull=False calls brings back every newer value.
    step(jnp.ones((LANES, 4)))
    client.pmap(model, **_pmap_options())(jnp.zeros((LANES, 4)))
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 5.0))


def test_push_replaces_the_server_value(client):
    model = Affine(LANES)
    client.push(model)
    model.weight.value = jnp.full((LANES, 4), 7.0)
    client.push(model)
    model.weight.value = jnp.zeros((LANES, 4))
    client.pull(model.weight)
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 7.0))


def test_a_push_based_on_an_outdated_version_is_refused(client):
    model = Affine(LANES)
    client.pmap(model, pull=False, **_pmap_options())(jnp.ones((LANES, 4)))  # server: 2.0
    model.weight.value = jnp.full((LANES, 4), 7.0)  # based on 1.0: would lose the call's write
    with pytest.raises(statehost.client.StateConflictError, match="refused a lost update") as e:
        client.push(model)
    assert e.value.status == 409
    assert e.value.conflicts[0]["server_version"] == e.value.conflicts[0]["base_version"] + 1
    client.pull(model)
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 2.0))
    model.weight.value = jnp.full((LANES, 4), 7.0)  # now based on the newest version
    client.push(model)
    client.pull(model)
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 7.0))


def test_a_failing_call_changes_no_state(client):
    model = Affine(LANES)
    step = client.pmap(model, **_pmap_options())
    step(jnp.ones((LANES, 4)))

    flag = statehost.ShortTermState(jnp.zeros(()))

    def fails(delta):
        model.weight.value = model.weight.value + delta
        flag.value = flag.value + 1
        raise ValueError("boom after writing two states")

    model.weight.value = jnp.full((LANES, 4), 5.0)  # a local write, uploaded by the call
    with pytest.raises(statehost.client.RemoteExecutionError, match="boom") as info:
        client.pmap(fails, **_pmap_options())(jnp.ones((LANES, 4)))
    assert info.value.exception_type == "ValueError"
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 5.0))
    assert float(flag.value) == 0.0
    # The server rolled back the upload too: the next call uploads 5.0 again and adds 1.
    step(jnp.ones((LANES, 4)))
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 6.0))


def test_remote_traceback_starts_at_the_user_function(client):
    def user_function_that_fails(x):
        return x + jnp.ones(3) @ jnp.ones(4)

    with pytest.raises(statehost.client.RemoteExecutionError) as info:
        client.jit(user_function_that_fails)(1.0)
    text = info.value.remote_traceback
    assert text.startswith("Traceback (most recent call last):")
    assert "user_function_that_fails" in text
    assert __file__ in text and "x + jnp.ones(3) @ jnp.ones(4)" in text
    assert "engine.py" not in text and "_stateful.py" not in text
    assert info.value.exception_type == "TypeError"


def test_default_stream_matches_local_draws(client):
    statehost.random.seed(123)
    remote = client.jit(lambda: statehost.random.normal(size=(3,)))()
    statehost.random.seed(123)
    local = jit(lambda: statehost.random.normal(size=(3,)))()
    np.testing.assert_array_equal(remote, np.asarray(local))
    # pull=True brought the advanced stream back: the next draws agree too.
    again_remote = client.jit(lambda: statehost.random.normal(size=(3,)))()
    statehost.random.seed(123)
    statehost.random.normal(size=(3,))
    np.testing.assert_array_equal(again_remote, np.asarray(statehost.random.normal(size=(3,))))


def test_random_state_in_pmap_advances_once_per_call(client):
    rng = statehost.random.RandomState(0)
    local_rng = copy.deepcopy(rng)
    options = dict(axis_name="i", in_axes=0, out_axes=0,
                   state_in_axes={0: statehost.util.filter.OfType(statehost.random.RandomState)},
                   state_out_axes={0: statehost.util.filter.OfType(statehost.random.RandomState)})
    remote = client.pmap(lambda s: rng.normal(0.0, s), **options)
    local = pmap(lambda s: local_rng.normal(0.0, s), **options)
    scales = jnp.linspace(1.0, 2.0, LANES)
    for _ in range(2):
        np.testing.assert_array_equal(remote(scales), np.asarray(local(scales)))
    np.testing.assert_array_equal(rng.value, local_rng.value)


def test_deleted_session_is_reopened_and_states_reuploaded(client):
    model = Affine(LANES)
    step = client.pmap(model, **_pmap_options())
    step(jnp.ones((LANES, 4)))
    client._http.json("DELETE", f"/v1/sessions/{client._session}")
    step(jnp.ones((LANES, 4)))
    np.testing.assert_array_equal(model.weight.value, np.full((LANES, 4), 3.0))


def test_expired_session_with_remote_only_values_says_they_are_lost(client, app):
    model = Affine(LANES)
    step = client.pmap(model, pull=False, **_pmap_options())
    step(jnp.ones((LANES, 4)))
    runtime = app.state.runtime
    runtime.expire_sessions(now=float("inf"))
    assert len(runtime.store) == 0
    with pytest.raises(statehost.client.StateNotFoundError, match="values are gone"):
        step(jnp.ones((LANES, 4)))


def test_states_of_another_session_are_invisible(client, transport):
    model = Affine(LANES)
    client.push(model)
    with statehost.connect("http://statehost.test", token=client._http.client.headers[
            "authorization"].split()[1], transport=transport) as other:
        with pytest.raises(statehost.client.StateNotFoundError, match="no state with id"):
            other.pull(model)


def test_closing_frees_the_session_and_its_states(app, transport):
    from tests.inprocess import TOKEN, URL

    client = statehost.connect(URL, token=TOKEN, transport=transport, dispatch="sync")
    client.push(Affine(LANES))
    assert len(app.state.runtime.store) == 1
    client.close()
    assert len(app.state.runtime.store) == 0
    with pytest.raises(statehost.client.ClientClosedError, match="closed"):
        client.push(Affine(LANES))
    with pytest.raises(RuntimeError):
        client.__enter__()


def test_push_rejects_things_that_are_not_states(client):
    with pytest.raises(TypeError, match=r"client.push\(model\)"):
        client.push(42)


def test_a_state_cannot_live_under_two_names(client):
    model = Affine(LANES)
    client.put("team/net", model)
    client.put("team/net", model)  # the same name again is an update, not a clash
    with pytest.raises(statehost.client.NameConflictError, match="already belongs to 'team/net'"):
        client.put("team/other", model)
    client.put("team/other", copy.deepcopy(model))
    assert [o["name"] for o in client.list("team")] == ["net", "other"]


def test_register_takes_a_local_transform_too(client):
    weight = statehost.ParamState(jnp.zeros(2, jnp.float32), name="w")
    client.put("team/w", weight)

    def step(x):
        weight.value = weight.value + x
        return weight.value

    remote_signature = client.register("team/remote", client.jit(step))
    local_signature = client.register("team/local", jit(step))

    assert local_signature == remote_signature


def test_register_refuses_what_is_not_a_transform(client):
    with pytest.raises(TypeError, match=r"register\('team/f', \.\.\.\): expected a transform "
                                        r"\(client.pmap / client.vmap / client.jit\), got "
                                        r"function"):
        client.register("team/f", lambda x: x)
