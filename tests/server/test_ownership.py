"""Ownership: a state id has one owner, a session belongs to its principal, and nothing a
caller does not own is overwritten, read or deleted (it answers 404)."""

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client import SessionNotFoundError, StateNotFoundError
from statehost.server.persistence import Database
from statehost.wire import (
    CONTENT_TYPE,
    CallRequest,
    GetRequest,
    PushRequest,
    StateRecord,
    decode,
    pack,
)
from tests.inprocess import TOKEN, URL


@pytest.fixture
def tokens(app, client):
    """``make(namespace, scope)`` -> a new namespace token the running app accepts."""
    runtime = app.state.runtime
    db = Database(runtime.settings.data_dir / "statehost.db")

    def make(namespace: str, scope: str) -> str:
        token = db.create_token(namespace, scope)
        runtime.tokens.reload()
        return token

    yield make
    db.close()


def _connect(transport, token):
    return statehost.connect(URL, token=token, transport=transport, dispatch="sync")


def _raw(transport, token, path, message):
    with httpx.Client(base_url=URL, transport=transport) as http:
        return http.post(path, content=message.to_frame().to_bytes(), headers={
            "content-type": CONTENT_TYPE, "authorization": f"Bearer {token}"})


def _session(transport, token):
    with httpx.Client(base_url=URL, transport=transport) as http:
        return http.post("/v1/sessions", headers={"authorization": f"Bearer {token}"}).json()["id"]


def _push(transport, token, session, state_id, value):
    record = StateRecord(statehost.ParamState, state_id, "x", None, value)
    return _raw(transport, token, "/v1/states/push", PushRequest(
        session=session, uploads={state_id: None}, states=pack([record], refs=False)))


@pytest.fixture
def named_in_b(client):
    """A named state of namespace ``b`` (put by the admin client), and its value."""
    w = statehost.ParamState(jnp.arange(4.0), name="w")
    client.put("b/obj", w)
    return w


def test_a_push_cannot_overwrite_another_namespaces_named_state(
        transport, tokens, client, named_in_b):
    a = tokens("a", "submit")
    session = _session(transport, a)
    response = _push(transport, a, session, named_in_b.id, np.full(4, -1.0, np.float32))
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["type"] == "StateNotFoundError" and error["missing"] == [named_in_b.id]
    assert "belongs to someone else" in error["message"]
    again = client.get("b/obj")
    np.testing.assert_array_equal(again.value, np.arange(4.0))
    assert client.info("b/obj")["states"][0]["version"] == 1


def test_an_upload_in_a_call_cannot_take_another_sessions_state(transport, client, tokens):
    mine = statehost.ParamState(jnp.ones(2))
    client.jit(lambda: mine.value * 2)()  # uploads `mine` into the admin client's session
    a = tokens("a", "submit")
    with _connect(transport, a) as other:
        thief = statehost.ParamState.restore(jnp.zeros(2), id=mine.id)
        with pytest.raises(StateNotFoundError, match="belongs to someone else"):
            other.jit(lambda: thief.value + 1)()
    np.testing.assert_array_equal(client.jit(lambda: mine.value * 1)(), np.ones(2))


def test_a_freed_id_is_not_taken_over_by_another_principal(transport, app, tokens):
    a, b = tokens("a", "submit"), tokens("b", "submit")
    session_a = _session(transport, a)
    state_id = statehost.ParamState(0.0).id
    assert _push(transport, a, session_a, state_id, np.zeros(2)).status_code == 200
    with httpx.Client(base_url=URL, transport=transport) as http:
        http.delete(f"/v1/sessions/{session_a}", headers={"authorization": f"Bearer {a}"})
    session_b = _session(transport, b)
    assert _push(transport, b, session_b, state_id, np.ones(2)).status_code == 404
    session_a2 = _session(transport, a)  # the same principal may bring it back
    assert _push(transport, a, session_a2, state_id, np.ones(2)).status_code == 200


def test_two_clients_in_one_process_work_side_by_side(transport, tokens):
    """A notebook re-runs its connect cell: both clients share the process's random stream."""
    w = statehost.ParamState(jnp.ones(2))
    with _connect(transport, TOKEN) as c1, _connect(transport, tokens("a", "submit")) as c2:
        fa = c1.jit(lambda: w.value + 1)
        fb = c2.jit(lambda: jnp.ones(3) * 2)
        fa()
        fb()
        # was: StateNotFoundError for the id of the process's default random stream
        np.testing.assert_array_equal(fa(), 2 * np.ones(2))
        draw_1 = c1.jit(lambda: statehost.random.normal(size=(2,)))
        draw_2 = c2.jit(lambda: statehost.random.normal(size=(2,)))
        first, _, again = np.asarray(draw_1()), draw_2(), np.asarray(draw_1())
        assert not np.array_equal(first, again)


def test_two_clients_to_two_servers(tmp_path):
    from statehost.server import Settings, create_app
    from statehost.server.testing import InProcessTransport

    transports = [InProcessTransport(create_app(Settings(tokens=(TOKEN,), data_dir=tmp_path / n)))
                  for n in ("one", "two")]
    try:
        with _connect(transports[0], TOKEN) as c1, _connect(transports[1], TOKEN) as c2:
            draws = [c.jit(lambda: statehost.random.normal(size=(2,))) for c in (c1, c2)]
            for _ in range(2):
                for draw in draws:
                    assert np.asarray(draw()).shape == (2,)
    finally:
        for t in transports:
            t.shutdown()


def test_a_session_answers_only_its_own_principal(transport, tokens, client, named_in_b):
    """An A token using the admin's session id cannot read B/obj through it."""
    a = tokens("a", "submit")
    response = _raw(transport, a, "/v1/objects/get",
                    GetRequest(session=client._session, name="b/obj"))
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["type"] == "SessionNotFoundError"
    assert client._session not in error["message"]  # never the full id
    assert client._session[:8] in error["message"]


def test_a_read_token_cannot_delete_another_principals_session(transport, tokens, client):
    reader = tokens("a", "read")
    with httpx.Client(base_url=URL, transport=transport) as http:
        response = http.delete(f"/v1/sessions/{client._session}",
                               headers={"authorization": f"Bearer {reader}"})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "SessionNotFoundError"
    w = statehost.ParamState(jnp.ones(2))
    np.testing.assert_array_equal(client.jit(lambda: w.value + 1)(), 2 * np.ones(2))


def test_the_client_reopens_a_session_only_with_its_own_token(transport, tokens):
    """A client whose session was closed by its own token gets a new one, transparently."""
    a = tokens("a", "submit")
    with _connect(transport, a) as c:
        w = statehost.ParamState(jnp.ones(2))
        c.jit(lambda: w.value)()
        with httpx.Client(base_url=URL, transport=transport) as http:
            http.delete(f"/v1/sessions/{c._session}", headers={"authorization": f"Bearer {a}"})
        np.testing.assert_array_equal(c.jit(lambda: w.value + 1)(), 2 * np.ones(2))
    with pytest.raises(SessionNotFoundError):
        raise SessionNotFoundError("the class exists and is a NotFoundError")


def test_the_lock_table_holds_only_calls_in_flight(transport, client, app):
    scheduler = app.state.runtime.scheduler
    w = statehost.ParamState(jnp.ones(2))
    step = client.jit(lambda: w.value)
    step()
    unknown = tuple(statehost.ParamState(0).id for _ in range(1000))
    for chunk in range(0, 1000, 250):
        message = CallRequest(session=client._session, digest=step.placement.packed(step).digest,
                              refs=(w.id, *unknown[chunk:chunk + 250]),
                              args=pack(((), {})))
        response = _raw(transport, TOKEN, "/v1/call", message)
        assert response.status_code == 404
        assert len(response.json()["error"]["missing"]) == 250
    assert scheduler.lock_count() == 0


def test_a_pull_reply_is_a_frame_of_state_values(transport, client):
    w = statehost.ParamState(jnp.arange(3.0))
    client.push(w)
    from statehost.wire import PullReply, PullRequest

    response = _raw(transport, TOKEN, "/v1/states/pull",
                    PullRequest(session=client._session, ids=(w.id,)))
    reply = PullReply.from_frame(decode(response.content))
    ((state_id, value),) = reply.states.load()
    assert state_id == w.id and reply.state_versions == {w.id: 1}
    np.testing.assert_array_equal(value, np.arange(3.0))
