"""The JSON API (no pickles) against a real ``statehost serve``, with plain httpx."""

import io

import httpx
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.server.persistence import Database
from tests.serving import running_server

NPY = "application/x-npy"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("json")
    (tmp / "data").mkdir()
    db = Database(tmp / "data" / "statehost.db")
    tokens = {"read": db.create_token("team", "read"),
              "invoke": db.create_token("team", "invoke"),
              "other": db.create_token("other", "admin")}
    db.close()
    with running_server(tmp, env={"STATEHOST_JSON_MAX_ELEMENTS": "16"}) as served:
        served.tokens = tokens
        with statehost.connect(served.url, token=served.token) as client:
            counter = statehost.State(jnp.array(0, jnp.int32))
            client.put("team/counter", counter)
            client.put("team/w", statehost.State(jnp.arange(6, dtype=jnp.float32).reshape(2, 3)))
            client.put("team/big", statehost.State(jnp.arange(100, dtype=jnp.float32)))

            def step(by):
                counter.value = counter.value + by
                return {"count": counter.value}

            def boom(x):
                raise ValueError("boom on purpose")

            served.signature = client.register("team/step", client.jit(step))
            client.register("team/boom", client.jit(boom))
        yield served


def _http(served, token=None):
    token = served.token if token is None else token
    return httpx.Client(base_url=served.url, headers={"authorization": f"Bearer {token}"},
                        timeout=60)


def test_metadata(served):
    with _http(served) as http:
        states = http.get("/v1/namespaces/team/states").json()["states"]
        assert {s["name"] for s in states} == {"counter", "w", "big"}
        info = http.get("/v1/namespaces/team/states/w").json()
        assert info["leaves"] == [{"shape": [2, 3], "dtype": "float32"}]
        assert info["status"] == "ok"
        assert http.get("/v1/namespaces/team/states/nope").status_code == 404
        r = http.get("/v1/namespaces/nowhere/states/w")
        assert r.status_code == 404


def test_read_value_json_and_npy(served):
    with _http(served) as http:
        r = http.get("/v1/namespaces/team/states/w/value")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["data"] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
        assert (body["dtype"], body["shape"]) == ("float32", [2, 3])
        assert r.headers["x-statehost-version"] == str(body["version"])
        r = http.get("/v1/namespaces/team/states/w/value", headers={"accept": NPY})
        assert r.status_code == 200 and r.headers["content-type"] == NPY
        array = np.lib.format.read_array(io.BytesIO(r.content))
        np.testing.assert_array_equal(array, np.arange(6, dtype=np.float32).reshape(2, 3))
        assert r.headers["etag"] == f'"{body["version"]}"'


def test_large_value_needs_npy(served):
    with _http(served) as http:
        r = http.get("/v1/namespaces/team/states/big/value")
        assert r.status_code == 413
        assert NPY in r.json()["error"]["message"]
        r = http.get("/v1/namespaces/team/states/big/value", headers={"accept": NPY})
        assert np.lib.format.read_array(io.BytesIO(r.content)).shape == (100,)


def test_write_with_if_match(served):
    with _http(served) as http:
        version = http.get("/v1/namespaces/team/states/w").json()["version"]
        new = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
        r = http.put("/v1/namespaces/team/states/w/value", json={"data": new},
                     headers={"if-match": str(version)})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == version + 1
        assert http.get("/v1/namespaces/team/states/w/value").json()["data"] == new
        r = http.put("/v1/namespaces/team/states/w/value", json={"data": new},
                     headers={"if-match": str(version)})
        assert r.status_code == 412
        assert str(version) in r.json()["error"]["message"]
        assert str(version + 1) in r.json()["error"]["message"]
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.zeros((2, 3), np.float32))
        r = http.put("/v1/namespaces/team/states/w/value", content=buf.getvalue(),
                     headers={"content-type": NPY})
        assert r.status_code == 200, r.text
        assert r.json()["version"] == version + 2


def test_write_bad_shape_or_dtype(served):
    with _http(served) as http:
        r = http.put("/v1/namespaces/team/states/w/value", json={"data": [1.0, 2.0]})
        assert r.status_code == 422
        assert "expected [2, 3]" in r.json()["error"]["message"]
        r = http.put("/v1/namespaces/team/states/w/value",
                     json={"data": [[1, 2, 3], [4, 5, 6]], "dtype": "int32"})
        assert r.status_code == 422
        assert "expected float32" in r.json()["error"]["message"]


def test_invoke_registered_function(served):
    assert [p["name"] for p in served.signature["parameters"]] == ["by"]
    with _http(served, served.tokens["invoke"]) as http:
        listed = http.get("/v1/namespaces/team/functions").json()["functions"]
        assert {f["name"] for f in listed} == {"team/step", "team/boom"}
        step = next(f for f in listed if f["name"] == "team/step")
        assert step["states"] == ["counter"]
        before = http.get("/v1/namespaces/team/states/counter").json()["version"]
        r = http.post("/v1/namespaces/team/functions/step/invoke", json={"args": [3]})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"] == {"count": 3}
        assert r.json()["versions"] == {"counter": before + 1}
        r = http.post("/v1/namespaces/team/functions/step/invoke",
                      json={"kwargs": {"by": {"data": 2, "dtype": "int32"}}})
        assert r.json()["outputs"] == {"count": 5}
        assert http.get("/v1/namespaces/team/states/counter/value").json()["data"] == 5
        r = http.post("/v1/namespaces/team/functions/boom/invoke", json={"args": [[1.0]]})
        assert r.status_code == 422
        assert r.json()["error"]["type"] == "RemoteExecutionError"
        assert "boom on purpose" in r.json()["error"]["message"]
        assert http.post("/v1/namespaces/team/functions/nope/invoke",
                         json={}).status_code == 404


def test_auth_and_isolation(served):
    assert httpx.get(served.url + "/v1/namespaces/team/states").status_code == 401
    with _http(served, "wrong") as http:
        assert http.get("/v1/namespaces/team/states").status_code == 401
    with _http(served, served.tokens["other"]) as http:
        assert http.get("/v1/namespaces/team/states").status_code == 404
        assert http.get("/v1/namespaces/team/states/w/value").status_code == 404
        assert http.post("/v1/namespaces/team/functions/step/invoke",
                         json={"args": [1]}).status_code == 404
        assert http.get("/v1/namespaces/other/states").json()["states"] == []
    with _http(served, served.tokens["read"]) as http:
        assert http.get("/v1/namespaces/team/states/w/value").status_code == 200
        r = http.put("/v1/namespaces/team/states/w/value", json={"data": [[0.0] * 3] * 2})
        assert r.status_code == 403
        assert http.post("/v1/namespaces/team/functions/step/invoke",
                         json={"args": [1]}).status_code == 403
