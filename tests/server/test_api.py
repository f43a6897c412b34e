"""The HTTP surface of the app: auth on every route, info, sessions, metrics, versions."""

import os
import socket

import httpx
import jax.numpy as jnp
import pytest

import statehost
import statehost.client
from statehost.server import Settings, create_app
from statehost.server.testing import InProcessTransport
from statehost.wire import CONTENT_TYPE, encode, local_versions
from tests.inprocess import TOKEN, URL

ROUTES = [
    ("GET", "/v1/info"),
    ("POST", "/v1/sessions"),
    ("DELETE", "/v1/sessions/abc"),
    ("POST", "/v1/call"),
    ("POST", "/v1/calls/abc/cancel"),
    ("POST", "/v1/states/push"),
    ("POST", "/v1/states/pull"),
    ("GET", "/metrics"),
]


@pytest.fixture
def http(transport):
    with httpx.Client(base_url=URL, transport=transport) as http:
        yield http


def test_health_is_open(http):
    assert http.get("/v1/health").json() == {"status": "ok"}


@pytest.mark.parametrize("method, path", ROUTES)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {TOKEN}"])
def test_every_other_route_needs_the_token(http, method, path, auth):
    headers = {"authorization": auth} if auth else {}
    response = http.request(method, path, headers=headers)
    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "AuthError"
    assert ("no token" if auth is None else "not accepted") in error["message"]


def test_info_lists_versions_devices_and_limits(http):
    info = http.get("/v1/info", headers={"authorization": f"Bearer {TOKEN}"}).json()
    assert info["versions"] == local_versions()
    assert [d["id"] for d in info["devices"]] == list(range(8))
    assert {"id", "platform", "kind", "memory"} <= set(info["devices"][0])
    assert info["limits"]["max_body"] == 64 * 2**20
    assert info["limits"]["call_timeout"] == 3600 and info["limits"]["session_workers"] == 2
    assert info["calls"] == {"queued": 0, "running": 0, "stuck": []}


def test_connect_with_a_wrong_token_raises_auth_error(transport):
    with pytest.raises(statehost.client.AuthError, match="not accepted"):
        statehost.connect(URL, token="wrong", transport=transport, dispatch="sync")


def test_connect_refuses_a_server_with_other_versions(tmp_path):
    app = create_app(Settings(tokens=(TOKEN,), data_dir=tmp_path))
    other = {**local_versions(), "jax": "0.4.30", "python": "3.9"}
    app.state.versions = other
    transport = InProcessTransport(app)
    try:
        with pytest.raises(statehost.client.VersionMismatchError) as info:
            statehost.connect(URL, token=TOKEN, transport=transport, dispatch="sync")
        message = str(info.value)
        assert "jax: client has" in message and "server has 0.4.30" in message
        assert "python" in message and "server has 3.9" in message
    finally:
        transport.shutdown()


def test_server_refuses_frames_from_other_versions(http):
    auth = {"authorization": f"Bearer {TOKEN}", "content-type": CONTENT_TYPE}
    frame = encode({"session": "x"})
    body = bytearray(frame.to_bytes())
    good = f'"jax":"{local_versions()["jax"]}"'.encode()
    body = body.replace(good, good.replace(b'"jax":"0.', b'"jax":"9.'))
    response = http.post("/v1/call", content=bytes(body), headers=auth)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "VersionMismatchError"
    assert "server has" in error["message"] and "client has 9." in error["message"]


def test_sessions_open_and_close(http, app):
    auth = {"authorization": f"Bearer {TOKEN}"}
    session = http.post("/v1/sessions", headers=auth).json()
    assert session["ttl"] == 3600.0
    assert http.delete(f"/v1/sessions/{session['id']}", headers=auth).status_code == 204
    again = http.delete(f"/v1/sessions/{session['id']}", headers=auth)
    assert again.status_code == 404
    assert again.json()["error"]["type"] == "SessionNotFoundError"
    assert "POST /v1/sessions" in again.json()["error"]["message"]


def test_a_session_records_the_clients_host_and_process(http, app):
    auth = {"authorization": f"Bearer {TOKEN}"}
    opened = http.post("/v1/sessions", headers=auth,
                       json={"client": {"host": "lab-box", "pid": 4242}})
    assert opened.status_code == 201, opened.text
    session = app.state.runtime.sessions._sessions[opened.json()["id"]]
    assert session.writer == "server token (lab-box, pid 4242)"
    bare = http.post("/v1/sessions", headers=auth)  # curl opens sessions without a body
    assert bare.status_code == 201


@pytest.mark.parametrize("client", [{"host": "x" * 300, "pid": 1}, {"host": "a\nb", "pid": 1},
                                    {"host": "box", "pid": -1}, {"host": "box"}])
def test_a_session_refuses_a_malformed_client_description(http, client):
    auth = {"authorization": f"Bearer {TOKEN}"}
    refused = http.post("/v1/sessions", headers=auth, json={"client": client})
    assert refused.status_code == 422
    assert refused.json()["error"]["type"] == "ValidationError"
    assert "client" in refused.json()["error"]["message"]


def test_the_clients_host_and_process_are_the_writer_of_what_it_commits(client):
    counter = statehost.ShortTermState(jnp.zeros(()))
    client.put("team/counter", counter)
    writer = f"server token ({socket.gethostname()}, pid {os.getpid()})"
    assert client.info("team/counter")["states"][0]["writer"] == writer


def test_a_json_write_is_written_by_the_token_and_the_callers_address(client):
    client.put("team/counter", statehost.ShortTermState(jnp.zeros(())))
    written = client._http.client.put("/v1/namespaces/team/states/counter/value",
                                      json={"data": 3.0})
    assert written.status_code == 200, written.text
    writer = client.info("team/counter")["states"][0]["writer"]
    assert writer.startswith("server token (JSON API from "), writer


def test_metrics_expose_the_documented_names(client):
    import jax.numpy as jnp

    client.jit(lambda x: x + 1)(jnp.ones(2))
    text = client._http.client.get("/metrics").text
    for name in ["statehost_calls_total", "statehost_call_seconds_bucket",
                 "statehost_compiles_total", "statehost_wire_bytes_total",
                 "statehost_resident_state_bytes", "statehost_sessions",
                 "statehost_queue_depth"]:
        assert name in text, name
    assert 'statehost_calls_total{outcome="ok"} 1.0' in text
    assert "statehost_sessions 1.0" in text


def test_wrong_content_type_is_refused(http):
    response = http.post("/v1/call", content=b"{}", headers={
        "authorization": f"Bearer {TOKEN}", "content-type": "application/json"})
    assert response.status_code == 415
    assert CONTENT_TYPE in response.json()["error"]["message"]


def test_openapi_documents_the_json_api(http):
    assert http.get("/docs").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    for path in ["/v1/namespaces/{namespace}/states", "/v1/namespaces/{namespace}/objects",
                 "/v1/health", "/v1/info"]:
        assert path in paths, sorted(paths)
    assert any(p.endswith("/value") for p in paths)
    assert any(p.endswith("/invoke") for p in paths)


def test_openapi_says_which_operations_need_the_bearer_token(http):
    schema = http.get("/openapi.json").json()
    scheme = schema["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    assert schema["paths"]["/v1/info"]["get"]["security"] == [{"bearerAuth": []}]
    assert schema["paths"]["/v1/health"]["get"].get("security", []) == []
    assert http.get("/v1/health").status_code == 200  # as documented: open


def test_named_state_bytes_per_namespace(client):
    import jax.numpy as jnp

    client.put("team/w", statehost.ParamState(jnp.ones(1000)))
    text = client._http.client.get("/metrics").text
    assert 'statehost_namespace_state_bytes{namespace="team"} 4000.0' in text
