"""The byte ledger: exact resident bytes per namespace, session and device after put,
commit, delete, session expiry and a restart, as /v1/info, /v1/namespaces and /metrics
show them."""

import time

import httpx
import jax.numpy as jnp
import pytest

import statehost
from statehost.server import Settings, create_app
from statehost.server.ledger import OPERATOR_NAMESPACE, Ledger, device_bytes
from statehost.server.persistence import Database
from statehost.server.testing import InProcessTransport
from statehost.util.filter import OfType
from tests.serving import metric_value

TOKEN = "ledger-token"
URL = "http://statehost.test"


class Box:
    """An in-process server on ``data_dir``; ``restart()`` starts a new one on it."""

    def __init__(self, data_dir, **settings):
        self.data_dir, self.settings = data_dir, settings
        self._start()

    def _start(self):
        self.app = create_app(Settings(tokens=(TOKEN,), data_dir=self.data_dir,
                                       **self.settings))
        self.transport = InProcessTransport(self.app)
        self.rt = self.app.state.runtime
        self.http = httpx.Client(base_url=URL, transport=self.transport,
                                 headers={"authorization": f"Bearer {TOKEN}"})

    def connect(self, token=TOKEN):
        return statehost.connect(URL, token=token, transport=self.transport, dispatch="sync")

    def token(self, namespace, scope):
        db = Database(self.data_dir / "statehost.db")
        try:
            token = db.create_token(namespace, scope)
        finally:
            db.close()
        self.rt.tokens.reload()
        return token

    def namespace(self, name, token=TOKEN):
        listed = self.http.get("/v1/namespaces",
                               headers={"authorization": f"Bearer {token}"}).json()
        return next(ns for ns in listed["namespaces"] if ns["name"] == name)

    def info(self):
        return self.http.get("/v1/info").json()["ledger"]

    def metric(self, name, **labels):
        return metric_value(self.http.get("/metrics").text, name, **labels)

    def close(self):
        self.http.close()
        self.transport.shutdown()

    def restart(self):
        self.close()
        self._start()


@pytest.fixture
def box(tmp_path):
    box = Box(tmp_path / "data", durability="sync")
    yield box
    box.close()


def _ones(n):
    return jnp.ones(n, jnp.float32)  # 4 bytes each


def test_a_put_is_charged_to_its_namespace_on_the_device_it_lands(box):
    with box.connect() as client:
        client.put("team/w", statehost.ParamState(_ones(1000)))
        ns = box.namespace("team")
        assert ns["ledger"] == {"bytes": 4000, "by_device": {"cpu:0": 4000}, "states": 1,
                                "named_bytes": 4000, "session_bytes": 0}
        assert box.info()["namespaces"]["team"]["bytes"] == 4000
        assert box.metric("statehost_ledger_bytes", namespace="team", device="cpu:0") == 4000


def test_a_commit_that_grows_or_reshards_a_state_is_measured_exactly(box):
    with box.connect() as client:
        w = statehost.ParamState(_ones(1000))
        client.put("team/w", w)
        client.jit(lambda: setattr(w, "value", jnp.concatenate([w.value, w.value])))()
        assert box.namespace("team")["ledger"]["by_device"] == {"cpu:0": 8000}

        m = statehost.ParamState(jnp.ones((8, 100), jnp.float32))
        client.put("team/m", m)
        assert box.namespace("team")["ledger"]["by_device"] == {"cpu:0": 8000 + 3200}

        def step(x):
            m.value = m.value + x
            return x

        pmapped = client.pmap(step, in_axes=0, state_in_axes={0: OfType(statehost.ParamState)},
                              state_out_axes={0: OfType(statehost.ParamState)})
        pmapped(jnp.ones((8, 100), jnp.float32))
        by_device = box.namespace("team")["ledger"]["by_device"]  # m: one row per device now
        assert by_device == {"cpu:0": 8000 + 400, **{f"cpu:{i}": 400 for i in range(1, 8)}}
        info = box.info()  # every device's total: this namespace's and the session's
        session = info["namespaces"][OPERATOR_NAMESPACE]["by_device"]
        assert info["devices"] == {d: n + session.get(d, 0) for d, n in by_device.items()}
        assert box.metric("statehost_device_state_bytes", device="cpu:5") == 400


def test_a_delete_and_a_replacing_put_free_their_bytes(box):
    with box.connect() as client:
        client.put("team/w", statehost.ParamState(_ones(1000)))
        client.put("team/w", statehost.ParamState(_ones(10)))  # a new state replaces it
        assert box.namespace("team")["ledger"]["bytes"] == 40
        client.delete("team/w")
        assert box.namespace("team")["ledger"]["bytes"] == 0
        assert box.metric("statehost_ledger_bytes", namespace="team", device="cpu:0") == 0


def test_anonymous_states_are_charged_to_their_session_and_its_principals_namespace(box):
    team = box.token("team", "submit")
    with box.connect(team) as client:
        client.push(statehost.ShortTermState(_ones(250)))
        ledger = box.namespace("team", team)["ledger"]
        assert ledger["session_bytes"] == 1000 and ledger["by_device"] == {"cpu:0": 1000}
        assert ledger["named_bytes"] == 0
        mine = box.info()["sessions"][client._session[:8]]
        assert mine["bytes"] == ledger["session_bytes"]
    assert "team" not in box.info()["namespaces"]  # closing the session freed them


def test_an_operator_sessions_states_are_charged_to_the_operator_namespace(box):
    with box.connect() as client:
        client.push(statehost.ShortTermState(_ones(250)))
        usage = box.info()["namespaces"][OPERATOR_NAMESPACE]
        assert usage["session_bytes"] >= 1000 and usage["named_bytes"] == 0
        assert OPERATOR_NAMESPACE in {ns["name"] for ns in
                                      box.http.get("/v1/namespaces").json()["namespaces"]}


def test_a_session_that_expires_leaves_nothing_in_the_ledger(box):
    with box.connect() as client:
        client.push(statehost.ShortTermState(_ones(250)))
        sid = client._session
        assert box.rt.store.ledger.session(sid).bytes >= 1000
        box.rt.expire_sessions(time.monotonic() + box.rt.settings.session_ttl + 1)
        assert box.rt.store.ledger.session(sid).bytes == 0
        assert sid[:8] not in box.info()["sessions"]
        assert box.info()["namespaces"].get(OPERATOR_NAMESPACE, {"bytes": 0})["bytes"] == 0


def test_a_restart_reloads_the_same_figures(box):
    with box.connect() as client:
        w = statehost.ParamState(jnp.ones((8, 100), jnp.float32))
        client.put("team/w", w)
        client.pmap(lambda x: setattr(w, "value", w.value + x), in_axes=0,
                    state_in_axes={0: OfType(statehost.ParamState)},
                    state_out_axes={0: OfType(statehost.ParamState)})(jnp.ones((8, 100)))
        client.put("team/v", statehost.ParamState(_ones(10)))
        before = box.namespace("team")["ledger"]
    box.restart()
    assert box.namespace("team")["ledger"] == before
    assert before["by_device"]["cpu:7"] == 400 and before["by_device"]["cpu:0"] == 440


def test_ledger_sums_and_largest_states():
    ledger = Ledger()
    ledger.record("a", "team", None, jnp.ones(10, jnp.float32))
    ledger.record("b", "team", "s1", jnp.ones(100, jnp.float32))
    ledger.record("c", "other", None, jnp.ones(1, jnp.float32))
    assert ledger.namespace("team").bytes == 440
    assert ledger.session("s1").bytes == 400
    assert ledger.largest("team") == [("b", 400), ("a", 40)]
    ledger.move("b", "other")
    assert (ledger.namespace("team").bytes, ledger.namespace("other").named_bytes) == (40, 404)
    ledger.drop(["a", "b", "c"])
    assert ledger.total().bytes == 0 and len(ledger) == 0
    assert device_bytes({"x": 1.0, "y": jnp.ones(2, jnp.float32)}) == {"cpu:0": 8}
