"""The dashboard in a real headless Chromium, against a real ``statehost serve``.

Chromium is driven through its DevTools protocol (a WebSocket; the ``websockets`` package
the client already uses): open a page, read the live DOM with ``Runtime.evaluate``, take a
screenshot. The screenshot is kept in ``test-artifacts/dashboard.png``.
"""

import base64
import contextlib
import itertools
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import jax.numpy as jnp
import pytest
from websockets.sync.client import connect as ws_connect

import statehost
from tests.serving import running_server

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
STEP = 0.02  # seconds each step of the test's loop sleeps on the server
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome"))), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary (chromium, chromium-browser or google-chrome); "
    ".ci/run installs Debian's chromium package when it is missing")


class _Page:
    """One Chromium tab, driven over the DevTools protocol."""

    def __init__(self, ws_url: str):
        # Entered as a context manager: websockets 17.1+ deprecates using it without one.
        self._exit = contextlib.ExitStack()
        self._ws = self._exit.enter_context(ws_connect(ws_url, max_size=64 * 2**20,
                                                       open_timeout=30))
        self._ids = itertools.count(1)

    def send(self, method, **params):
        call_id = next(self._ids)
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:  # events come in between; the answer carries our id
            message = json.loads(self._ws.recv(timeout=30))
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def open(self, url):
        self.send("Page.navigate", url=url)

    def value(self, expression):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.value(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"the page never satisfied {expression!r}; it shows: "
                             f"{self.value('document.body && document.body.innerText')!r}")

    def close(self):
        self._exit.close()


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium; yields a function opening a new tab."""
    log = tmp_path / "chromium.log"  # a file, not a pipe: nobody reads it once started
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'chromium'}",
             "--window-size=1280,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=sink)
    port = None
    deadline = time.monotonic() + 60
    while port is None and time.monotonic() < deadline and proc.poll() is None:
        found = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", log.read_text())
        port = int(found.group(1)) if found else time.sleep(0.1)
    if port is None:
        proc.kill()
        pytest.fail("Chromium did not start its DevTools endpoint:\n" + log.read_text())
    pages = []

    def new_page():
        target = httpx.put(f"http://127.0.0.1:{port}/json/new?about:blank", timeout=30).json()
        page = _Page(target["webSocketDebuggerUrl"])
        page.send("Page.enable")
        pages.append(page)
        return page

    yield new_page
    for page in pages:
        page.close()
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_the_dashboard_in_a_browser(tmp_path, browser):
    with running_server(tmp_path) as served, \
            statehost.connect(served.url, token=served.token) as client:
        page = browser()

        page.open(f"{served.url}/dashboard")  # no token: the login form, no data
        page.wait_for("document.querySelector('form#login') !== null")
        assert page.value("document.querySelector('#devices') === null")

        page.open(f"{served.url}/dashboard?token=wrong")
        page.wait_for("document.querySelector('#login-error').textContent.includes("
                      "'not accepted')")

        page.open(f"{served.url}/dashboard?token={served.token}")
        page.wait_for("document.querySelectorAll('#devices tbody tr').length === 8")
        assert served.token not in page.value("location.href")  # it left the address bar
        assert page.value("document.cookie") == ""  # HttpOnly: the scripts cannot read it

        counter = statehost.ParamState(jnp.zeros((), jnp.int32))

        def step():
            import jax

            jax.debug.callback(lambda: time.sleep(STEP))
            counter.value = counter.value + 1
            return counter.value

        job = client.loop(client.jit(step), 2000, wait=False, progress=False)
        done = f"document.querySelector('#jobs tr[data-job=\"{job.id}\"] td.done')"
        first = page.wait_for(f"{done} && parseInt({done}.textContent) > 0 && "
                              f"{done}.textContent")
        time.sleep(1.5)
        second = page.wait_for(f"parseInt({done}.textContent) > {int(first.split()[0])} && "
                               f"{done}.textContent")
        assert int(second.split()[0]) > int(first.split()[0]), (first, second)
        assert first.endswith("/ 2000")
        page.wait_for("document.querySelectorAll('#recent tbody tr').length > 0")

        shot = page.send("Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))
        job.cancel()
