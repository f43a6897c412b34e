"""``FrameTransport``: the one seam through which the client's frames travel.

A transport sends one encoded frame (one ``bytes`` when small, else chunks, with its
length) to a path and returns the status and the whole answer body; status mapping,
decoding and errors are the caller's (``_http.Http.frame``), so every transport runs the
same production path around it. Implementations:

- :class:`StdlibFrameTransport`, the default: kept-alive HTTP/1.1 connections on
  plain ``socket``s, speaking only what a frame POST needs. On a small machine an
  httpx round trip costs about 200 µs more client CPU than the same request through
  ``http.client`` (353 vs 161 µs for a 400-byte echo), and ``http.client`` about
  100 µs more than this (136 vs 34 µs for a 740-byte echo against uvicorn: its
  ``email``-package header parser and buffered reader are most of it); a small
  request goes out in one write, and a body is read into one preallocated buffer.
- :class:`HttpxFrameTransport`: through an ``httpx.Client``, for an injected
  httpx transport that is not a ``FrameTransport`` itself.
- ``statehost.server.testing.InProcessTransport``: the real app in this process
  (tests), which is an httpx transport and a ``FrameTransport`` at once.
"""

from __future__ import annotations

import http.client
import select
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import httpx

from statehost.client._errors import ClientError, TransportError
from statehost.client._progress import THRESHOLD, receiving
from statehost.wire import fresh_buffer

__all__ = ["FrameTransport", "HttpxFrameTransport", "StdlibFrameTransport"]

Body = bytes | bytearray | memoryview


@runtime_checkable
class FrameTransport(Protocol):
    """Sends a frame; returns ``(status, body)``. Raises ``OSError``/httpx errors as they
    come: the caller maps them to ``TransportError`` in one place."""

    def post_frame(self, path: str, chunks: Body | Iterable[Body], nbytes: int,
                   headers: dict[str, str]) -> tuple[int, Body]: ...

    def close(self) -> None: ...


class StdlibFrameTransport:
    """Kept-alive HTTP/1.1 connections to one server (``http`` or ``https``)."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float,
                 unix: str | None = None):
        self._unix = unix  # a Unix socket path: connect there, whatever the URL's host
        parts = urllib.parse.urlsplit(base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        # The Host header as http.client writes it: brackets for IPv6, the port unless default.
        host = f"[{self._host}]" if ":" in self._host else self._host
        if self._port != (443 if self._https else 80):
            host = f"{host}:{self._port}"
        self._host_header = host
        self._headers = headers
        self._timeout = timeout
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None

    def _connection(self) -> _Connection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.dropped():
                    return conn
                conn.close()
        if self._https and self._tls is None:
            # What http.client.HTTPSConnection uses; the hook PEP 476 documents for opting
            # out of verification is honoured this way too.
            self._tls = ssl._create_default_https_context()
            self._tls.set_alpn_protocols(["http/1.1"])
        return _Connection(self._host, self._port, self._timeout, self._tls, self._unix)

    def post_frame(self, path: str, chunks: Body | Iterable[Body], nbytes: int,
                   headers: dict[str, str]) -> tuple[int, Body]:
        lines = [f"POST {self._prefix}{path} HTTP/1.1", f"Host: {self._host_header}",
                 "Accept-Encoding: identity"]
        for name, value in {**self._headers, **headers}.items():
            if "\r" in value or "\n" in value:  # http.client's refusal, and its text
                raise ValueError(f"Invalid header value {value.encode('latin-1')!r}")
            lines.append(f"{name}: {value}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        conn = self._connection()
        try:
            conn.send(head, chunks)
            status, will_close, data = conn.response()
        except BaseException:
            conn.close()
            raise
        if will_close:
            conn.close()
        else:
            with self._lock:
                self._idle.append(conn)
        return status, data

    def close(self) -> None:
        with self._lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()


# A body up to this size goes out in the same write as the request head; above it, the
# copy that joining them takes costs more than the second write saves.
_ONE_WRITE = 64 * 1024
_MAX_HEAD = 64 * 1024  # bytes of status line and headers (or of a chunk-size line)
_RECV = 64 * 1024


class _Connection:
    """One HTTP/1.1 connection: sends a POST, reads its answer.

    ``http.client`` writes a request's head and body separately: with TCP_NODELAY that is
    two segments, and the server's event loop woke up twice per call; here a small body
    goes in the head's write. Failures raise ``http.client``'s exception classes, so the
    caller's messages read as they did with it.
    """

    def __init__(self, host: str, port: int, timeout: float, tls: ssl.SSLContext | None,
                 unix: str | None = None):
        if unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(unix)
            except BaseException:
                sock.close()
                raise
            self.sock, self._buffer = sock, bytearray()
            return
        sock = socket.create_connection((host, port), timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self._buffer = bytearray()  # received, not yet consumed

    def dropped(self) -> bool:
        """True when the server closed this idle connection (it reads as ready, at EOF)."""
        if self._buffer:
            return True  # bytes after the last answer: the connection is out of step
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        self.sock.close()

    def send(self, head: bytes, body: Body | Iterable[Body]) -> None:
        if isinstance(body, bytes | bytearray | memoryview):
            if len(body) <= _ONE_WRITE:
                self.sock.sendall(head + body)
                return
            body = (body,)
        self.sock.sendall(head)
        for chunk in body:
            self.sock.sendall(chunk)

    def response(self) -> tuple[int, bool, Body]:
        """``(status, whether the server closes the connection, body)``."""
        while True:
            status_line, lines = self._head()
            version, _, rest = status_line.partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
                raise http.client.BadStatusLine(status_line)
            status = int(code)
            if status >= 200 or status == 101:
                break  # 1xx answers (100 Continue) come before the real one
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        will_close = "close" in connection or (
            version == "HTTP/1.0" and "keep-alive" not in connection)
        if status in (204, 304):
            return status, will_close, b""
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return status, will_close, self._chunked()
        length = headers.get("content-length")
        if length is None or not length.isdigit():
            return status, True, self._to_eof()  # the answer ends with the connection
        return status, will_close, self._exactly(int(length))

    def _fill(self) -> bool:
        chunk = self.sock.recv(_RECV)
        self._buffer += chunk
        return bool(chunk)

    def _head(self) -> tuple[str, list[str]]:
        """The status line and the header lines of the next answer."""
        buffer, start = self._buffer, 0
        while (end := buffer.find(b"\r\n\r\n", start)) < 0:
            if len(buffer) > _MAX_HEAD:
                raise http.client.LineTooLong("header line")
            start = max(0, len(buffer) - 3)
            if not self._fill():
                if not buffer:
                    raise http.client.RemoteDisconnected(
                        "Remote end closed connection without response")
                raise http.client.IncompleteRead(bytes(buffer))
        lines = buffer[:end].decode("iso-8859-1").split("\r\n")
        del buffer[: end + 4]
        return lines[0], lines[1:]

    def _exactly(self, nbytes: int) -> memoryview:
        """The next ``nbytes``, in one fresh buffer (no joins of pieces)."""
        view = fresh_buffer(nbytes)
        pos = min(len(self._buffer), nbytes)
        view[:pos] = self._buffer[:pos]
        del self._buffer[:pos]
        if nbytes < THRESHOLD:  # the small answers of the hot path: no progress hook
            self._receive(view, pos, nbytes, None)
        else:
            receiving(nbytes, lambda advance: self._receive(view, pos, nbytes, advance))
        return view

    def _receive(self, view: memoryview, pos: int, nbytes: int,
                 advance: Callable[[int], None] | None) -> None:
        if advance is not None:
            advance(pos)
        while pos < nbytes:
            n = self.sock.recv_into(view[pos:])
            if not n:
                raise TransportError(f"the answer ended after {pos} of {nbytes} bytes")
            pos += n
            if advance is not None:
                advance(n)

    def _to_eof(self) -> bytearray:
        while self._fill():
            pass
        body, self._buffer = self._buffer, bytearray()
        return body

    def _chunked(self) -> bytearray:
        body = bytearray()
        while True:
            try:
                size = int(self._line().split(b";", 1)[0], 16)
            except ValueError:
                raise http.client.IncompleteRead(bytes(body)) from None
            if size == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                return body
            body += self._exactly(size)
            if self._line():
                raise http.client.IncompleteRead(bytes(body))

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n")) < 0:
            if len(self._buffer) > _MAX_HEAD:
                raise http.client.LineTooLong("chunk size")
            if not self._fill():
                raise http.client.IncompleteRead(bytes(self._buffer))
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 2]
        return line


class HttpxFrameTransport:
    """Frames through an ``httpx.Client`` (an injected transport that speaks only httpx)."""

    def __init__(self, client: httpx.Client):
        self._client = client

    def post_frame(self, path: str, chunks: Body | Iterable[Body], nbytes: int,
                   headers: dict[str, str]) -> tuple[int, Body]:
        with self._client.stream("POST", path, content=chunks, headers=headers) as response:
            return response.status_code, _read_httpx(response)

    def close(self) -> None:
        """The httpx client is closed by its owner."""


def _read_httpx(response: httpx.Response) -> Body:
    """The whole body, into one buffer allocated once when the length is known.

    ``iter_raw()`` without a chunk size hands over httpcore's own reads; with
    one, httpx joins them into new ``bytes`` first (a copy: 0.6 vs 1.0 GB/s).
    """
    length = response.headers.get("content-length")
    if length is None or not length.isdigit():
        body = bytearray()
        for chunk in response.iter_raw():
            body += chunk
        return body
    view = fresh_buffer(int(length))
    pos = 0
    for chunk in response.iter_raw():
        end = pos + len(chunk)
        if end > view.nbytes:
            raise ClientError(f"the server sent more than its Content-Length {length}")
        view[pos:end] = chunk
        pos = end
    if pos != view.nbytes:
        raise TransportError(f"the answer ended after {pos} of {length} bytes")
    return view


