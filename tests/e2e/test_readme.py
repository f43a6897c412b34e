"""The README's examples run as written, against a real ``statehost serve``.

The ```python blocks run one after the other in one fresh interpreter, as cells of a
notebook would, and the ```bash block of the JSON API runs after them, every ``curl``
line of it; only the server's URL (``make serve``'s ``http://127.0.0.1:8470``) is
replaced by the test server's. The token comes as it would for a user on the server's
machine: from the token file a server started without tokens writes. Every operation
of the OpenAPI document is listed in the README.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serving import running_server

README = Path(__file__).parents[2] / "README.md"
DEFAULT_URL = "http://127.0.0.1:8470"


def _blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.M | re.S)


def _json_api_block():
    blocks = [b for b in _blocks("bash") if "curl " in b]
    assert len(blocks) == 1, "the README has one bash block of curl examples"
    return blocks[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme")
    with running_server(tmp, token=None) as served:
        served.tmp = tmp
        yield served


def _env(served):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    env.update({"XDG_CONFIG_HOME": str(served.tmp / "xdg"), "HOME": str(served.tmp / "home"),
                "JAX_PLATFORMS": "cpu"})
    return env


def test_the_python_blocks_run_against_a_real_server(served):
    blocks = _blocks("python")
    assert len(blocks) >= 3
    cells = []
    for number, block in enumerate(blocks, 1):
        for url in re.findall(r"https?://[^\s\"')]+", block):
            assert url.startswith(DEFAULT_URL), f"block {number} connects to {url}"
        cells.append(f"print('--- README python block {number}', flush=True)\n"
                     + block.replace(DEFAULT_URL, served.url))
    script = served.tmp / "readme_blocks.py"
    script.write_text("\n".join(cells))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=_env(served), cwd=served.tmp, timeout=300)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    assert f"--- README python block {len(blocks)}" in run.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_examples_run_against_a_real_server(served):
    """After the Python blocks (which put team/net, team/counter and register team/add)."""
    block = _json_api_block().replace(DEFAULT_URL, served.url)
    # Only the harness differs from what a user runs: fail on an HTTP error, and say which.
    harness = ('set -euo pipefail\n'
               'curl() { command curl -fsS --max-time 60 "$@"; echo; }\n'
               "trap 'echo \"failed: $BASH_COMMAND\" >&2' ERR\n")
    run = subprocess.run(["bash", "-c", harness + block], capture_output=True, text=True,
                         env=_env(served), cwd=served.tmp, timeout=300)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert '"status":"ok"' in run.stdout  # /v1/health answered


def test_every_operation_of_the_openapi_document_is_in_the_readme(served):
    text = README.read_text()
    operations = httpx.get(served.url + "/openapi.json").json()["paths"]
    missing = []
    for path, methods in operations.items():
        shown = re.sub(r"\{[^}]+\}", lambda m: "{" + m[0][1:-1].split("_")[0] + "}", path)
        for method in methods:
            wanted = f"{method.upper()} {shown}"
            if wanted not in text.replace("{ns}", "{namespace}").replace("{id}", "{session}"):
                missing.append(wanted)
    assert missing == []
    curls = _json_api_block()
    json_paths = [p for p, m in operations.items()
                  if not any("vnd.statehost.frame" in str(o.get("requestBody", ""))
                             for o in m.values())]
    for path in json_paths:
        pattern = re.sub(r"\\\{[^}]+\\\}", "[^/ ?\"]+", re.escape(path)) + r"(?![\w/])"
        assert re.search(pattern, curls), f"no curl example for {path}"
