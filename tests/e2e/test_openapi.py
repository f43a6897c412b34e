"""schemathesis against a real ``statehost serve``: the OpenAPI document tells the whole truth.

One server holds a named state ``team/net``, a pytree state ``team/tree`` and a
registered function ``team/fn``; schemathesis (its CLI, bounded, with a fixed seed)
fuzzes every JSON operation twice, with the operator's admin token and with a read-only
token of namespace ``team``, and checks that every answer is documented (status, content
type and body schema), that schema-valid requests are accepted, that schema-violating
ones are rejected, that undocumented methods get 405, and that nothing is a 5xx. The
binary frame operations are documented but left out: ``test_fuzz.py`` attacks them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import jax.numpy as jnp
import pytest

import statehost
from tests.serving import Served, running_server

pytestmark = [pytest.mark.adversarial, pytest.mark.long(seconds=230)]

CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "negative_data_rejection", "positive_data_acceptance",
          "unsupported_method", "allow_header_conformance"]
FRAME_PATHS = r"^/v1/(call|states/push|states/pull|objects/put|objects/get|functions/register)$"
# every operation but the 7 frame ones (POST /v1/jobs: CONFIG) and the dashboard's endless
# event stream (CONFIG)
JSON_OPERATIONS = 26
MAX_EXAMPLES = 80  # per operation and phase: ~20 s per token on 2 cores

# Real names mixed into the generated ones, so requests reach real states, not only 404s.
CONFIG = r"""
[dictionaries.namespaces]
values = ["team"]

[dictionaries.names]
values = ["net", "tree", "fn"]

[parameters]
"path.namespace" = { dictionary = "namespaces", probability = 0.5 }
"path.name" = { dictionary = "names", probability = 0.5 }

# POST /v1/jobs takes a frame (its answer is JSON): left out like FRAME_PATHS, which cannot
# name it without GET /v1/jobs.
[[operations]]
include-name = "POST /v1/jobs"
enabled = false

# The dashboard's snapshots as server-sent events: a stream without end (while the page is
# open); GET /v1/dashboard answers the same snapshot once, and is tested.
[[operations]]
include-name = "GET /v1/dashboard/events"
enabled = false

# Well-formed requests that the state itself refuses: a value of another shape or dtype, a
# pytree state (422), an If-Match of an older version (412), a value too large for JSON
# (413), a registered function that raises (422). No schema can foresee these.
[[operations]]
include-path-regex = '/states/\{name\}/value$|/invoke$'
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "412",
                                                     "413", "422"]
"""


@dataclass
class Api:
    served: Served
    reader: str  # a token with scope read on namespace "team"
    tmp: Path


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("openapi")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    made = subprocess.run(
        [sys.executable, "-m", "statehost.server", "token", "create", "--init", "--namespace",
         "team", "--scope", "read", "--data-dir", str(tmp / "data")],
        capture_output=True, text=True, timeout=60, env=env, check=True)
    reader = made.stdout.strip().splitlines()[-1]
    with running_server(tmp) as served:
        with statehost.connect(served.url, token=served.token) as client:
            net = statehost.ParamState(jnp.arange(4.0, dtype=jnp.float32))
            client.put("team/net", net)
            client.put("team/tree", statehost.ParamState({"a": jnp.zeros(2), "b": jnp.ones(3)}))

            def fn(x):
                net.value = net.value + x
                return net.value * 2

            client.register("team/fn", client.jit(fn))
        yield Api(served, reader, tmp)


def schemathesis(api: Api, token: str, name: str) -> dict:
    """Runs ``st run`` on the server's document; returns its JSON report."""
    config = api.tmp / "schemathesis.toml"
    config.write_text(CONFIG)
    report = api.tmp / f"{name}.json"
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
         f"{api.served.url}/openapi.json", "-H", f"Authorization: Bearer {token}",
         "--checks", ",".join(CHECKS), "--exclude-path-regex", FRAME_PATHS,
         "--max-examples", str(MAX_EXAMPLES), "--seed", "20261201", "--workers", "1",
         "--generation-database", "none", "--no-color", "--report", "json",
         "--report-json-path", str(report)],
        capture_output=True, text=True, timeout=600, cwd=api.tmp)
    assert report.exists(), run.stdout[-5000:] + run.stderr[-5000:]
    result = json.loads(report.read_text())
    result["output"] = run.stdout
    return result


def summary(result: dict) -> str:
    failures = ", ".join(f"{f['code']} {f['title']}: {f['count']} on {len(f['operations'])} "
                         "operations" for f in result["failures"]) or "no failures"
    return (f"schemathesis: {result['operations']['tested']} operations, "
            f"{result['test_cases']['generated']} test cases, {failures}")


@pytest.mark.parametrize("who", ["reader", "admin"])  # the admin may delete team/net: last
def test_schemathesis_finds_nothing(api, who):
    token = api.reader if who == "reader" else api.served.token
    result = schemathesis(api, token, who)
    print(f"\n{who}: {summary(result)}")
    assert result["operations"]["tested"] == JSON_OPERATIONS, result["operations"]
    assert not result["errors"], result["errors"]
    assert not result["failures"], f"{summary(result)}\n{result['output'][-20000:]}"
    assert api.served.process.poll() is None


def test_health_needs_no_token_and_everything_else_does(api):
    doc = httpx.get(api.served.url + "/openapi.json").json()
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            if (path, method) == ("/v1/health", "get"):
                assert "security" not in operation
                assert "401" not in operation["responses"]
            else:
                assert operation["security"] == [{"bearerAuth": []}], (method, path)
                assert {"401", "403"} <= set(operation["responses"]), (method, path)


def test_frame_operations_document_their_bodies_and_errors(api):
    doc = httpx.get(api.served.url + "/openapi.json").json()
    frame = {"application/vnd.statehost.frame": {"schema": {"type": "string",
                                                            "format": "binary"}}}
    for path in ("/v1/call", "/v1/states/push", "/v1/states/pull", "/v1/objects/put",
                 "/v1/objects/get", "/v1/functions/register"):
        operation = doc["paths"][path]["post"]
        assert operation["requestBody"]["content"] == frame, path
        assert operation["responses"]["200"]["content"] == frame, path
        assert {"400", "401", "403", "404", "413", "415"} <= set(operation["responses"]), path
        for status, response in operation["responses"].items():
            if status != "200":
                assert response["content"] == {"application/json": {"schema": {
                    "$ref": "#/components/schemas/Error"}}}, (path, status)


@pytest.mark.parametrize(("path", "methods"), [
    ("/v1/namespaces/team/objects/net", {"GET", "DELETE"}),
    ("/v1/namespaces/team/states/net/value", {"GET", "PUT"}),
])
def test_allow_header_lists_every_method_of_a_path(api, path, methods):
    response = httpx.request("PATCH", api.served.url + path,
                             headers={"authorization": f"Bearer {api.served.token}"})
    assert response.status_code == 405
    allowed = {m.strip() for m in response.headers["allow"].split(",")} - {"HEAD"}
    assert allowed == methods


def test_a_name_with_a_trailing_newline_is_refused(api):
    response = httpx.put(api.served.url + "/v1/namespaces/team%0A", json={"durability": "sync"},
                         headers={"authorization": f"Bearer {api.served.token}"})
    assert response.status_code == 422, response.text
