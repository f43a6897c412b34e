"""The dashboard's login, its snapshot, and what each token sees (the real app, in process).

The page itself, rendered by a real browser, is tested in tests/e2e/test_dashboard_browser.py.
"""

import json

import httpx
import jax.numpy as jnp
import pytest

import statehost
from statehost.server.calls import Call
from statehost.server.persistence import Database
from statehost.server.routes.dashboard import COOKIE
from tests.inprocess import TOKEN, URL

SSE_BUDGET = 20 * 1024  # bytes per snapshot: at one a second, the page costs <= 20 KB/s


@pytest.fixture
def http(transport):
    with httpx.Client(transport=transport, base_url=URL, follow_redirects=False) as http:
        yield http


def _bearer(token):
    return {"authorization": f"Bearer {token}"}


def _log_in(http, token=TOKEN):
    answer = http.get("/dashboard", params={"token": token})
    assert answer.status_code == 303, answer.text
    return answer


def _events(text):
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        assert lines["event"] == "snapshot"
        events.append(json.loads(lines["data"]))
    return events


def test_without_a_login_the_page_is_a_login_form_and_never_data(http):
    page = http.get("/dashboard")
    assert page.status_code == 401
    assert '<form method="get" action="/dashboard"' in page.text
    assert "dashboard.js" not in page.text and "devices" not in page.text.lower()
    refused = http.get("/v1/dashboard")
    assert refused.status_code == 401
    assert "no token and no dashboard login" in refused.json()["error"]["message"]
    assert http.get("/v1/dashboard/events", params={"count": 1}).status_code == 401


def test_a_wrong_token_gets_the_form_again_with_the_reason(http):
    page = http.get("/dashboard", params={"token": "not-a-token"})
    assert page.status_code == 401
    assert "That token is not accepted by this server." in page.text
    assert COOKIE not in page.headers.get("set-cookie", "")


def test_a_token_in_the_address_becomes_an_http_only_strict_cookie(http):
    answer = _log_in(http)
    assert answer.headers["location"] == "/dashboard"  # the token leaves the address bar
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and TOKEN not in cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    page = http.get("/dashboard")
    assert page.status_code == 200 and "/dashboard/static/dashboard.js" in page.text
    assert http.get("/v1/dashboard").status_code == 200
    assert http.get("/dashboard/static/dashboard.js").headers["content-type"].startswith(
        "text/javascript")
    missing = http.get("/dashboard/static/secrets.txt")
    assert missing.status_code == 404 and "dashboard.css" in missing.json()["error"]["message"]


def test_the_snapshot_shows_devices_states_calls_and_sessions(client, http):
    w = statehost.ParamState(jnp.zeros((1024,)))  # 4 KiB resident once pushed

    def bump():
        w.value = w.value + 1
        return w.value[0]

    step = client.jit(bump)
    step()
    step()
    snap = http.get("/v1/dashboard", headers=_bearer(TOKEN)).json()
    assert len(snap["devices"]) == 8
    assert {d["platform"] for d in snap["devices"]} == {"cpu"}
    # The state, and the client's default random stream (a uint32[2] key: 8 bytes).
    assert sum(d["resident_bytes"] for d in snap["devices"]) == 4096 + 8
    assert snap["anonymous_bytes"] == 4096 + 8
    assert snap["sessions"]["count"] == 1 and snap["sessions"]["shown"][0]["states"] == 2
    calls = [c for c in snap["recent_calls"] if c["kind"] == "call"]
    assert [c["outcome"] for c in calls[:2]] == ["committed", "committed"]
    assert [c["compiled"] for c in calls[:2]] == [0, 1]  # newest first: the warm call
    assert all(c["bytes_out"] > 0 and c["running_s"] is not None for c in calls[:2])
    assert snap["calls_finished"] >= 2
    assert snap["compile_cache"]["functions"] == 1
    assert snap["compile_cache"]["programs"]["fresh"] == 1
    (own,) = [n for n in snap["namespaces"] if n["name"] == "default"]  # the operator's
    assert own["session_bytes"] == 4096 + 8 and own["max_bytes"] is None
    assert snap["viewer"] == {"namespace": None, "scope": "admin", "label": "server token"}


def test_a_namespace_token_sees_its_namespace_only(client, http, app, tmp_path):
    client.put("team/net", statehost.ParamState(jnp.ones((256,))))
    client.put("other/net", statehost.ParamState(jnp.ones((512,))))
    client.jit(lambda: jnp.ones(()))()  # an operator call: not the team's business
    db = Database(tmp_path / "data" / "statehost.db")
    reader = db.create_token("team", "read")
    db.close()
    app.state.runtime.tokens.reload()
    snap = http.get("/v1/dashboard", headers=_bearer(reader)).json()
    assert [n["name"] for n in snap["namespaces"]] == ["team"]
    assert snap["namespaces"][0]["resident_bytes"] == 1024
    assert snap["namespaces"][0]["named_bytes"] == 1024
    http.put("/v1/namespaces/team", json={"max_bytes": "1MiB"}, headers=_bearer(TOKEN))
    snap = http.get("/v1/dashboard", headers=_bearer(reader)).json()
    assert snap["namespaces"][0]["max_bytes"] == 2**20
    assert snap["anonymous_bytes"] is None
    assert all(d["resident_bytes"] is None for d in snap["devices"])
    assert snap["sessions"]["count"] == 0 and snap["recent_calls"] == []
    assert snap["viewer"]["namespace"] == "team"
    operator = http.get("/v1/dashboard", headers=_bearer(TOKEN)).json()
    assert {n["name"] for n in operator["namespaces"]} >= {"team", "other"}


def test_the_event_stream_sends_small_snapshots(http, app):
    history = app.state.call_history
    for i in range(1500):  # more than the history keeps
        call = Call("call", None, (), lambda c: None, id=f"{i:016x}")
        call.notes.update(compiled=0, bytes_in=100, bytes_out=100)
        history.record(call)
    assert len(history) == 1000 and history.total == 1500
    _log_in(http)
    answer = http.get("/v1/dashboard/events", params={"count": 3, "interval": 0.25})
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = _events(answer.text)
    assert len(events) == 3
    assert all(len(json.dumps(e)) <= SSE_BUDGET for e in events)
    assert events[0]["recent_calls"][0]["id"] == f"{1499:016x}"
    assert len(events[0]["recent_calls"]) == 20


def test_recent_calls_include_the_asynchronous_ones(async_client, http):
    """Warm calls go over the call stream, where a channel runs them back to back on one
    worker without the scheduler seeing each: the history still has every one."""
    w = statehost.ParamState(jnp.zeros(()))

    def bump():
        w.value = w.value + 1
        return w.value

    step = async_client.jit(bump)
    step()  # the first call of the signature: blocking
    outs = [step() for _ in range(10)]
    async_client.sync()
    assert float(outs[-1]) == 11.0
    snap = http.get("/v1/dashboard", headers=_bearer(TOKEN), params={"recent": 50}).json()
    calls = [c for c in snap["recent_calls"] if c["kind"] == "call"]
    assert len(calls) == 11, calls
    assert {c["outcome"] for c in calls} == {"committed"}
    assert all(c["running_s"] is not None and c["compiled"] == 0 for c in calls[:10])
