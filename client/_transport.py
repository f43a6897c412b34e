"""``FrameTransport``: the one seam through which the client's frames travel.

A transport sends one encoded frame (one ``bytes`` when small, else chunks, with its
length) to a path and returns the status and the whole answer body; status mapping,
decoding and errors are the caller's (``_http.Http.frame``), so every transport runs the
same production path around it. Implementations:

- :class:`StdlibFrameTransport`, the default: kept-alive ``http.client``
  connections. On a small machine an httpx round trip costs about 200 µs more
  client CPU than the same request through ``http.client`` (353 vs 161 µs for a
  400-byte echo), and ``readinto`` fills one preallocated buffer.
- :class:`HttpxFrameTransport`: through an ``httpx.Client``, for an injected
  httpx transport that is not a ``FrameTransport`` itself.
- ``statehost.server.testing.InProcessTransport``: the real app in this process
  (tests), which is an httpx transport and a ``FrameTransport`` at once.
"""

from __future__ import annotations

import http.client
import select
import threading
import urllib.parse
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import httpx

from statehost.client._errors import ClientError, TransportError
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
    """Kept-alive ``http.client`` connections to one server."""

    def __init__(self, base_url: str, headers: dict[str, str], timeout: float):
        parts = urllib.parse.urlsplit(base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._headers = headers
        self._timeout = timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not _dropped(conn):
                    return conn
                conn.close()
        cls = _OneWriteHTTPSConnection if self._https else _OneWriteHTTPConnection
        return cls(self._host, self._port, timeout=self._timeout)

    def post_frame(self, path: str, chunks: Body | Iterable[Body], nbytes: int,
                   headers: dict[str, str]) -> tuple[int, Body]:
        conn = self._connection()
        try:
            conn.request("POST", self._prefix + path, body=chunks,
                         headers={**self._headers, **headers})
            response = conn.getresponse()
            data = _read_stdlib(response)
        except BaseException:
            conn.close()
            raise
        if response.will_close:
            conn.close()
        else:
            with self._lock:
                self._idle.append(conn)
        return response.status, data

    def close(self) -> None:
        with self._lock:
            for conn in self._idle:
                conn.close()
            self._idle.clear()


# A body up to this size goes out in the same write as the request head; above it, the
# copy that joining them takes costs more than the second write saves.
_ONE_WRITE = 64 * 1024


class _OneWrite:
    """``http.client`` sends the request head and the body in two writes (``_send_output``).

    With TCP_NODELAY (which ``http.client`` sets) that is two segments, so the server's
    event loop wakes up for the head, parses it, and wakes up again for the body. A small
    body joined to the head is one write and one wake-up on each side (CPython itself
    did this before 3.0; ``bench/bench_remote.py --cases tiny`` measures the effect).
    ``_buffer`` holds the head's lines, as in every CPython 3 release.
    """

    def _send_output(self, message_body: object = None, encode_chunked: bool = False) -> None:
        if type(message_body) is bytes and len(message_body) <= _ONE_WRITE \
                and not encode_chunked:
            self._buffer.extend((b"", b""))  # type: ignore[attr-defined]
            head = b"\r\n".join(self._buffer)  # type: ignore[attr-defined]
            del self._buffer[:]  # type: ignore[attr-defined]
            self.send(head + message_body)  # type: ignore[attr-defined]
            return
        super()._send_output(message_body, encode_chunked)  # type: ignore[misc]


class _OneWriteHTTPConnection(_OneWrite, http.client.HTTPConnection):
    pass


class _OneWriteHTTPSConnection(_OneWrite, http.client.HTTPSConnection):
    pass


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


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """True when the server closed this idle connection (it reads as ready, at EOF)."""
    sock = conn.sock
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _read_stdlib(response: http.client.HTTPResponse) -> Body:
    length = response.getheader("content-length")
    if length is None or not length.isdigit():
        return response.read()
    view = fresh_buffer(int(length))
    pos = 0
    while pos < view.nbytes:
        n = response.readinto(view[pos:])
        if not n:
            raise TransportError(f"the answer ended after {pos} of {length} bytes")
        pos += n
    return view


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


