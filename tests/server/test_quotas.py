"""Per-namespace quotas: set and cleared through PUT /v1/namespaces/{ns}, defaults from the
settings, kept across a restart and in an old database, and every refusal (429
QuotaExceededError) with its message, leaving states, versions and the ledger unchanged."""

import asyncio
import sqlite3
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client import QuotaExceededError
from statehost.server.auth import Principal
from statehost.server.calls import Call
from statehost.server.errors import QuotaExceededError as ServerQuotaExceededError
from statehost.server.persistence import Database
from statehost.server.settings import Settings
from tests.server.test_ledger import TOKEN, Box

GATE = threading.Event()


@pytest.fixture
def box(tmp_path):
    box = Box(tmp_path / "data")
    yield box
    box.close()


@pytest.fixture(autouse=True)
def gate():
    GATE.clear()
    yield GATE
    GATE.set()


def _set(box, namespace, token=TOKEN, **body):
    return box.http.put(f"/v1/namespaces/{namespace}", json=body,
                        headers={"authorization": f"Bearer {token}"})


def _ones(n):
    return jnp.ones(n, jnp.float32)


# -- setting them -------------------------------------------------------------------------
def test_quotas_are_set_with_units_cleared_with_null_and_shown(box):
    response = _set(box, "team", max_bytes="8KiB", max_bytes_per_device=4096, max_sessions=2,
                    max_queued=3)
    assert response.status_code == 200, response.text
    quotas = response.json()["quotas"]
    assert quotas["max_bytes"] == 8192 and quotas["max_bytes_per_device"] == 4096
    assert (quotas["max_sessions"], quotas["max_queued"]) == (2, 3)
    assert box.namespace("team")["quotas"] == quotas
    cleared = _set(box, "team", max_sessions=None).json()["quotas"]
    assert cleared["max_sessions"] is None and cleared["max_bytes"] == 8192
    # durability still works on its own, and keeps the quotas
    assert _set(box, "team", durability="sync").json() == {"namespace": "team",
                                                           "durability": "sync"}
    assert box.namespace("team")["quotas"]["max_bytes"] == 8192


def test_defaults_come_from_the_settings_and_a_namespace_overrides_them(tmp_path):
    box = Box(tmp_path / "data", default_max_bytes=2**20, default_max_sessions=5)
    try:
        _set(box, "team", max_bytes="1KiB")
        _set(box, "other", durability="none")
        team, other = box.namespace("team")["quotas"], box.namespace("other")["quotas"]
        assert (team["max_bytes"], team["own"]["max_bytes"], team["max_sessions"]) == \
            (1024, 1024, 5)
        assert (other["max_bytes"], other["own"]["max_bytes"]) == (2**20, None)
        _set(box, "team", max_bytes=None)  # back to the default
        assert box.namespace("team")["quotas"]["max_bytes"] == 2**20
        defaults = box.http.get("/v1/info").json()["limits"]["quota_defaults"]
        assert defaults == {"max_bytes": 2**20, "max_bytes_per_device": None,
                            "max_sessions": 5, "max_queued": None}
    finally:
        box.close()


@pytest.mark.parametrize("body, match", [
    ({"max_bytes": -1}, "max_bytes: Input should be greater than or equal to 0"),
    ({"max_bytes": "lots"}, "size 'lots' is not understood"),
    ({"max_sessions": 0}, "max_sessions: Input should be greater than or equal to 1"),
    ({"max_queued": "3GiB"}, "max_queued"),
    ({}, "the body sets nothing"),
])
def test_bad_quota_bodies_are_refused_naming_the_field(box, body, match):
    response = _set(box, "team", **body)
    assert response.status_code == 422
    assert match in response.json()["error"]["message"]
    assert box.http.get("/v1/namespaces").json()["namespaces"] == []  # nothing created


def test_only_a_server_token_sets_quotas(box):
    submit = box.token("team", "submit")
    response = _set(box, "team", submit, max_bytes=10)
    assert response.status_code == 403
    assert "this needs scope 'admin'" in response.json()["error"]["message"]
    admin = box.token("team", "admin")  # a tenant's admin: its durability, not its quotas
    response = _set(box, "team", admin, max_bytes=10**12)
    assert response.status_code == 403
    assert "quotas are set by the box's operator: this token is admin of 'team' only" in \
        response.json()["error"]["message"]
    assert box.http.get("/v1/namespaces").json()["namespaces"] == []  # nothing was created
    assert _set(box, "team", admin, durability="sync").status_code == 200
    assert box.namespace("team")["quotas"]["max_bytes"] is None


def test_settings_refuse_bad_defaults():
    with pytest.raises(ValueError, match="default_max_queued=0 must be >= 1"):
        Settings(default_max_queued=0)
    assert Settings.from_env({"STATEHOST_DEFAULT_MAX_BYTES": "8GiB"}).default_max_bytes == 8 * 2**30


def test_quotas_survive_a_restart(box):
    _set(box, "team", max_bytes="1MiB", max_queued=7)
    box.restart()
    quotas = box.namespace("team")["quotas"]
    assert (quotas["max_bytes"], quotas["max_queued"]) == (2**20, 7)


def test_an_old_database_without_quota_columns_opens_and_keeps_its_namespaces(tmp_path):
    path = tmp_path / "data" / "statehost.db"
    path.parent.mkdir()
    with sqlite3.connect(path) as conn:  # the namespaces table as it was before quotas
        conn.execute("CREATE TABLE namespaces (name TEXT PRIMARY KEY, durability TEXT NOT "
                     "NULL, created REAL NOT NULL)")
        conn.execute("INSERT INTO namespaces VALUES ('team', 'sync', 0)")
    conn.close()
    db = Database(path)
    try:
        assert db.namespaces() == {"team": "sync"}
        assert db.quotas()["team"] == dict.fromkeys(
            ("max_bytes", "max_bytes_per_device", "max_sessions", "max_queued"))
        db.set_quotas("team", "interval", {"max_bytes": 10})
        db.ensure_namespace("new", "none")
        assert db.quotas()["team"]["max_bytes"] == 10 and db.namespaces()["new"] == "none"
    finally:
        db.close()
    box = Box(tmp_path / "data")  # and a server starts on it
    try:
        assert box.namespace("team")["quotas"]["max_bytes"] == 10
        assert box.namespace("team")["durability"] == "sync"
    finally:
        box.close()


# -- bytes ----------------------------------------------------------------------------------
def test_a_put_past_max_bytes_is_refused_before_anything_moves(box):
    _set(box, "team", max_bytes=6000)
    with box.connect() as client:
        client.put("team/w", statehost.ParamState(_ones(1000)))
        before = box.info()
        with pytest.raises(QuotaExceededError, match=r"namespace 'team' would exceed its quota "
                           r"max_bytes=5\.9 KiB \(6000 bytes\)\. It holds 3\.9 KiB \(4000 "
                           r"bytes\), and the uploads need 3\.9 KiB \(4000 bytes\) more") \
                as info:
            client.put("team/v", statehost.ParamState(_ones(1000)))
        assert info.value.status == 429
        assert "its largest states: 'team/w' (3.9 KiB)" in str(info.value)
        assert "statehost namespace set team --max-bytes SIZE" in str(info.value)
        assert (info.value.namespace, info.value.quota) == ("team", "max_bytes")
        assert info.value.body["largest"][0]["bytes"] == 4000
        assert box.info() == before  # nothing was placed, in the namespace or the session
        with pytest.raises(statehost.client.NotFoundError):
            client.get("team/v")
        client.put("team/w", statehost.ParamState(_ones(1200)))  # a replacement fits
        assert box.namespace("team")["ledger"]["bytes"] == 4800


def test_a_call_that_grows_a_state_past_max_bytes_is_rolled_back(box):
    _set(box, "team", max_bytes=6000)
    with box.connect() as client:
        w = statehost.ParamState(_ones(1000))
        client.put("team/w", w)
        grow = client.jit(lambda: setattr(w, "value", jnp.concatenate([w.value, w.value])))
        with pytest.raises(QuotaExceededError, match=r"would exceed its quota max_bytes=5\.9 KiB "
                           r"\(6000 bytes\)\. It holds 3\.9 KiB \(4000 bytes\), and the values "
                           r"this call commits need 3\.9 KiB \(4000 bytes\) more"):
            grow()
        again = client.get("team/w")
        np.testing.assert_array_equal(again.value, np.ones(1000))
        assert client.info("team/w")["states"][0]["version"] == 1
        assert box.namespace("team")["ledger"]["bytes"] == 4000
        client.jit(lambda: setattr(w, "value", w.value * 2))()  # a same-size commit passes
        assert client.info("team/w")["states"][0]["version"] == 2


def test_a_push_past_max_bytes_is_refused_for_the_tokens_namespace(box):
    _set(box, "team", max_bytes=1000)
    team = box.token("team", "submit")
    with box.connect(team) as client:
        client.push(statehost.ShortTermState(_ones(100)))
        with pytest.raises(QuotaExceededError, match=r"namespace 'team' would exceed its quota "
                           r"max_bytes=1000 B .* It holds 400 B \(400 bytes\), and the uploads "
                           r"need") as info:
            client.push(statehost.ShortTermState(_ones(200)))
        assert "anonymous state" in str(info.value)  # the largest is one of its session's
        assert box.namespace("team")["ledger"]["session_bytes"] == 400


def test_an_upload_past_max_bytes_per_device_names_the_device(box):
    _set(box, "team", max_bytes_per_device=3000)
    with box.connect() as client:
        with pytest.raises(QuotaExceededError, match=r"quota max_bytes_per_device=2\.9 KiB "
                           r"\(3000 bytes\) on each device\. It holds 0 B \(0 bytes\) on cpu:0"):
            client.put("team/w", statehost.ParamState(_ones(1000)))
        client.put("team/w", statehost.ParamState(_ones(700)))
    assert box.namespace("team")["ledger"]["by_device"] == {"cpu:0": 2800}


def test_a_namespace_over_a_lowered_quota_can_still_shrink(box):
    with box.connect() as client:
        w = statehost.ParamState(_ones(1000))
        client.put("team/w", w)
        _set(box, "team", max_bytes=100)
        client.jit(lambda: setattr(w, "value", w.value[:10]))()
        assert box.namespace("team")["ledger"]["bytes"] == 40


# -- sessions and queued calls ------------------------------------------------------------------
def test_a_session_past_max_sessions_is_refused_until_one_closes(box):
    _set(box, "team", max_sessions=1)
    team = box.token("team", "read")
    first = box.connect(team)
    with pytest.raises(QuotaExceededError, match=r"namespace 'team' has 1 open session\(s\), "
                       r"its quota max_sessions=1"):
        box.connect(team)
    assert box.namespace("team", team)["sessions"] == 1
    with box.connect() as operator:  # other namespaces' sessions are not counted
        assert operator.info is not None
    first.close()
    box.connect(team).close()


def _wait_at_gate(x):
    GATE.wait(60)
    return x


def _stuck(call):
    return float(jax.pure_callback(_wait_at_gate, jax.ShapeDtypeStruct((), jnp.float32),
                                   jnp.float32(1)))


def test_a_call_past_max_queued_is_refused_at_submit(box):
    _set(box, "team", max_queued=1)
    team = box.token("team", "submit")
    rt = box.rt
    session = rt.open_session(rt.tokens.get(team))
    other = rt.open_session(Principal(None, "admin", "operator"))

    async def main():
        running = asyncio.ensure_future(rt.submit(Call("call", session, ("k",), _stuck), "t"))
        queued = asyncio.ensure_future(rt.submit(Call("call", session, ("k",), _stuck), "t"))
        await asyncio.sleep(0)  # one turn of the loop: both are in the scheduler now
        assert (rt.scheduler.running, rt.quotas.queued_of("team")) == (1, 1)
        with pytest.raises(ServerQuotaExceededError, match=r"the call was not queued: "
                           r"namespace 'team' has 1 call\(s\) waiting in the server's queue, "
                           r"its quota max_queued=1"):
            await rt.submit(Call("call", session, ("j",), lambda c: 0), "POST /v1/call")
        assert await rt.submit(Call("call", other, ("j",), lambda c: 5), "t") == 5
        GATE.set()
        assert await asyncio.gather(running, queued) == [1.0, 1.0]
        assert await rt.submit(Call("call", session, ("j",), lambda c: 7), "t") == 7

    asyncio.run(main())


def test_naming_resident_states_counts_them_against_the_namespace(box):
    _set(box, "team", max_bytes=6000)
    with box.connect() as client:
        client.put("team/w", statehost.ParamState(_ones(1000)))
        v = statehost.ParamState(_ones(1000))
        client.push(v)  # resident in the session (charged to the operator's namespace)
        with pytest.raises(QuotaExceededError, match=r"It holds 3\.9 KiB \(4000 bytes\), and "
                           r"this request needs 3\.9 KiB \(4000 bytes\) more"):
            client.put("team/v", v)  # nothing to upload: only the naming moves bytes
        assert box.namespace("team")["ledger"]["bytes"] == 4000
        with pytest.raises(statehost.client.NotFoundError):
            client.get("team/v")


def test_an_async_client_gets_the_quota_error_and_keeps_working(box):
    _set(box, "team", max_bytes=6000)
    with statehost.connect("http://statehost.test", token=TOKEN,
                           transport=box.transport) as client:  # async dispatch: the stream
        assert client.dispatch == "async"
        w = statehost.ParamState(_ones(1000))
        client.put("team/w", w)
        double = client.jit(lambda x: setattr(w, "value", w.value * x))
        double(jnp.float32(2))  # the first call of a signature waits; later ones do not
        client.sync()
        w.value = _ones(2000)  # a local change: the next call uploads 8000 bytes
        with pytest.raises(QuotaExceededError, match="namespace 'team' would exceed its quota "
                           "max_bytes"):
            double(jnp.float32(2))  # a new state shape: a new signature, so it waits
            client.sync()
        assert box.namespace("team")["ledger"]["bytes"] == 4000
        np.testing.assert_array_equal(client.get("team/w").value, 2 * np.ones(1000))
        w.value = _ones(1000)
        double(jnp.float32(3))  # back under the quota: the stream goes on
        client.sync()



def test_writes_that_do_not_grow_a_namespace_over_a_lowered_quota_go_on(box):
    with box.connect() as client:
        client.put("team/w", statehost.ParamState(_ones(10)))
    _set(box, "team", max_bytes=10)  # below what it holds already
    response = box.http.put("/v1/namespaces/team/states/w/value", json={"data": [2.0] * 10})
    assert response.status_code == 200, response.text
    assert box.http.get("/v1/namespaces/team/states/w/value").json()["data"] == [2.0] * 10
    with box.connect() as client:
        with pytest.raises(QuotaExceededError, match="It holds 40 B"):
            client.put("team/v", statehost.ParamState(_ones(1)))
