"""A client that hangs up mid-upload is the client's doing: one info line, no traceback,
and the server keeps serving."""

import socket
import time

import httpx
import pytest

from statehost.wire import CONTENT_TYPE
from tests.serving import running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("server")) as served:
        yield served


def _hang_up_mid_upload(served, path: str) -> None:
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                f"Authorization: Bearer {served.token}\r\nContent-Length: {64 << 20}\r\n\r\n")
        sock.sendall(head.encode() + b"SHF1" + b"\0" * (1 << 20))
        time.sleep(0.2)


@pytest.mark.parametrize("path", ["/v1/call", "/v1/states/push", "/v1/objects/put"])
def test_a_hang_up_mid_upload_is_one_info_line(server, path):
    before = server.output().count("disconnected before its request body was read whole")
    _hang_up_mid_upload(server, path)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = server.output()
        if log.count("disconnected before its request body was read whole") > before:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"no disconnect line in the server log:\n{server.output()[-2000:]}")
    assert "unhandled error" not in log and "Traceback" not in log, log[-3000:]
    assert f"INFO statehost.server: POST {path}: the client disconnected" in log
    assert httpx.get(server.url + "/v1/health", timeout=10).status_code == 200
