"""``StdlibFrameTransport``: the client's own HTTP/1.1 connections, against a real socket.

A scripted server on a loopback port answers each request with the next canned bytes, so
the answers a uvicorn behind a proxy may give (chunked bodies, ``Connection: close``, a
``100 Continue`` first, a cut-off body) are each exercised; the e2e tests drive the same
transport against ``statehost serve``.
"""

import http.client
import shutil
import socket
import ssl
import subprocess
import threading

import pytest

from statehost.client._errors import TransportError
from statehost.client._http import _translate
from statehost.client._transport import StdlibFrameTransport

CLOSE = "close"


class ScriptedServer:
    """Answers request ``i`` (head and Content-Length body, read whole) with ``answers[i]``;
    an answer of ``None`` closes the connection instead, and ``(bytes, CLOSE)`` closes it
    after sending them."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests: list[bytes] = []
        self.reads: list[int] = []  # recv calls it took to read each request
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/base"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            self._answer_all()
        except OSError:  # closed by the test before every answer was asked for
            pass

    def _answer_all(self):
        while self.answers:
            conn, _ = self.sock.accept()
            self.connections += 1
            with conn:
                while self.answers:
                    request, reads = _read_request(conn)
                    if request is None:
                        break
                    self.requests.append(request)
                    self.reads.append(reads)
                    answer = self.answers.pop(0)
                    if answer is None:
                        break
                    if isinstance(answer, tuple):
                        conn.sendall(answer[0])
                        break
                    conn.sendall(answer)
                    if b"connection: close" in answer.lower():
                        break

    def close(self):
        self.sock.close()


def _read_request(conn):
    data, reads = b"", 0
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        reads += 1
        if not chunk:
            return None, reads
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += conn.recv(65536)
        reads += 1
    return head + b"\r\n\r\n" + body, reads


def _ok(body: bytes, *headers: bytes) -> bytes:
    extra = b"".join(h + b"\r\n" for h in headers)
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@pytest.fixture
def scripted():
    """``scripted(*answers)`` -> ``(server, transport)``; both closed after the test."""
    made = []

    def make(*answers, headers=None):
        server = ScriptedServer(answers)
        made.append((server, StdlibFrameTransport(server.url, headers or {}, 5.0)))
        return made[-1]

    yield make
    for server, transport in made:
        transport.close()
        server.close()


def _post(transport, body=b"frame"):
    headers = {"content-type": "application/vnd.statehost.frame",
               "content-length": str(len(body))}
    status, data = transport.post_frame("/v1/call", body, len(body), headers)
    return status, bytes(data)


def test_a_small_request_is_one_write_and_the_connection_is_kept(scripted):
    server, transport = scripted(_ok(b"one"), _ok(b"two"), headers={"authorization": "Bearer t"})

    assert _post(transport) == (200, b"one")
    assert _post(transport, b"x" * 1000) == (200, b"two")

    assert server.connections == 1 and server.reads == [1, 1]
    head = server.requests[0].split(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0] == b"POST /base/v1/call HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.url.split(':')[2].split('/')[0]}".encode() in head
    assert b"authorization: Bearer t" in head and b"content-length: 5" in head


def test_chunked_answers_and_a_100_continue_first(scripted):
    chunked = (b"HTTP/1.1 100 Continue\r\n\r\n"
               b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\ntrailer: x\r\n\r\n")
    server, transport = scripted(chunked, _ok(b"next"))

    assert _post(transport) == (201, b"abcdefg")
    assert _post(transport) == (200, b"next")
    assert server.connections == 1


def test_connection_close_and_a_body_without_length(scripted):
    server, transport = scripted(_ok(b"bye", b"Connection: close"),
                                 b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end",
                                 _ok(b"fresh"))

    assert _post(transport) == (200, b"bye")
    assert _post(transport) == (200, b"until the end")
    assert _post(transport) == (200, b"fresh")
    assert server.connections == 3


def test_a_cut_off_answer_says_how_much_arrived(scripted):
    _, transport = scripted((b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", CLOSE))

    with pytest.raises(TransportError, match="the answer ended after 3 of 10 bytes"):
        _post(transport)


def test_no_answer_at_all_is_a_transport_error_naming_the_url(scripted):
    _, transport = scripted(None)

    with pytest.raises(http.client.RemoteDisconnected):
        _post(transport)
    with pytest.raises(TransportError, match=r"POST /v1/call: the connection to http://x "
                       r"failed \(RemoteDisconnected: Remote end closed connection"), \
            _translate("POST /v1/call", "http://x", 5.0):
        raise http.client.RemoteDisconnected("Remote end closed connection without response")


def test_a_header_value_with_a_line_break_is_refused_before_sending(scripted):
    server, transport = scripted(_ok(b"unused"), headers={"authorization": "Bearer a\r\nx: y"})

    with pytest.raises(ValueError, match="Invalid header value"):
        _post(transport)
    assert server.requests == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for a test cert")
def test_https_verifies_the_server_certificate(tmp_path, monkeypatch):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key,
                    "-out", cert, "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"https://127.0.0.1:{sock.getsockname()[1]}"

    def serve(times):
        for _ in range(times):
            try:
                conn, _ = sock.accept()
            except OSError:  # closed by a failing test
                return
            try:
                with tls.wrap_socket(conn, server_side=True) as wrapped:
                    _read_request(wrapped)
                    wrapped.sendall(_ok(b"secret"))
            except ssl.SSLError:  # the client refused our certificate
                conn.close()

    thread = threading.Thread(target=serve, args=(2,), daemon=True)
    thread.start()
    try:
        untrusting = StdlibFrameTransport(url, {}, 5.0)
        with pytest.raises(ssl.SSLCertVerificationError):
            _post(untrusting)
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusting = StdlibFrameTransport(url, {}, 5.0)
        assert _post(trusting) == (200, b"secret")
        trusting.close()
    finally:
        thread.join(5)
        sock.close()
