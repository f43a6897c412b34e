"""HTTP for the client: JSON through httpx, frames through a ``FrameTransport``, and the
one mapping from transport failures and error answers to the client's exceptions.

A 401 to a client whose token came from the local server's token file makes it read the
file again and, when the token there changed, send the request once more with it
(``TokenSource``).

Large request bodies go out as 1 MiB memoryview chunks with a Content-Length;
large responses are read into one preallocated buffer, never joined from pieces.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx

from statehost._errors import WireError
from statehost.client import _progress as progress
from statehost.client._errors import (
    BY_TYPE,
    ClientClosedError,
    ClientError,
    ProtocolError,
    RemoteExecutionError,
    ServerError,
    TransportError,
    remote_execution_error,
)
from statehost.client._shared_memory import SharedMemoryChannel
from statehost.client._token import TokenSource
from statehost.client._transport import FrameTransport, HttpxFrameTransport, StdlibFrameTransport
from statehost.wire import CONTENT_TYPE, Frame, Message, decode

__all__ = ["Http", "client_error"]

_CHUNK = 1 << 20
log = logging.getLogger("statehost.client")


@contextlib.contextmanager
def _translate(what: str, url: str, timeout: float) -> Iterator[None]:
    """The one place where httpx and socket exceptions become statehost exceptions."""
    try:
        yield
    except (httpx.TimeoutException, TimeoutError) as exc:
        raise TransportError(
            f"{what}: no answer from {url} within {timeout:g} s ({type(exc).__name__}). "
            "Fix: pass a larger timeout= to statehost.connect, or check the server's load."
        ) from exc
    except (httpx.ConnectError, ConnectionRefusedError) as exc:
        raise TransportError(
            f"{what}: cannot connect to {url} ({exc}). Is `statehost serve` running there? "
            "Start it with `make serve` or `statehost serve`."
        ) from exc
    except httpx.HTTPError as exc:
        raise TransportError(f"{what}: the connection to {url} failed ({exc}).") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise TransportError(f"{what}: the connection to {url} failed "
                             f"({type(exc).__name__}: {exc}).") from exc


def _raise_for(status: int, body: bytes, what: str, note: str = "") -> None:
    """Raises the client exception of an error answer's kind (by its ``type``); ``note``
    follows the server's message."""
    if status < 400:
        return
    try:
        error = json.loads(body)["error"]
        message = str(error["message"])
    except Exception:
        error = {}
        message = f"HTTP {status}: {body[:500]!r}"
    raise client_error(status, error, message, what, note)


def client_error(status: int, error: dict[str, Any], message: str, what: str,
                 note: str = "") -> ClientError:
    """The client exception for an error answer (``error`` is the body's ``"error"``)."""
    cls = BY_TYPE.get(str(error.get("type", "")))
    if cls is None:
        cls = ServerError if status >= 500 else ProtocolError
    text = message if message.startswith(what) else f"{what}: {message}"
    text += note
    if error.get("traceback"):
        text += f"\n\nRemote traceback:\n{error['traceback']}"
    if cls is RemoteExecutionError:
        return remote_execution_error(text, status=status, body=error)
    return cls(text, status=status, body=error)


class Http:
    """The client's connection: JSON requests and frames, with statehost's errors."""

    def __init__(
        self,
        base_url: str,
        token: str | TokenSource | None,
        timeout: float,
        transport: httpx.BaseTransport | None,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # unix:///path/to.sock: HTTP over that Unix socket (the host in URLs is a dummy).
        self.unix = self.base_url[len("unix://"):] if self.base_url.startswith("unix://") \
            else None
        self.token = token if isinstance(token, TokenSource) else TokenSource.find(
            self.base_url, token) if token else TokenSource(None, "none")
        # One dict, shared with the frame transports: a re-read token reaches them too.
        self._headers = headers = {}
        if self.token.token:
            headers["authorization"] = f"Bearer {self.token.token}"
        self._transport = transport
        self.progress = True  # bars on large transfers (connect(progress=...))
        # Over the Unix socket: large buffers in shared memory (use_shared_memory).
        self.shared_memory: SharedMemoryChannel | None = None
        self.shared_memory_why = "not connected over the Unix socket"
        self._open()

    def _open(self) -> None:
        """The JSON client and the frame transport, over TCP or :attr:`unix`."""
        transport, headers, timeout = self._transport, self._headers, self.timeout
        http_url = "http://localhost" if self.unix is not None else self.base_url
        self._client: httpx.Client | None = httpx.Client(
            base_url=http_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=4),
            transport=transport if transport is not None or self.unix is None
            else httpx.HTTPTransport(uds=self.unix),
        )
        if transport is None:
            self.frames: FrameTransport = StdlibFrameTransport(http_url, headers, timeout,
                                                               unix=self.unix)
        elif isinstance(transport, FrameTransport):
            self.frames = _WithHeaders(transport, headers)
        else:
            self.frames = HttpxFrameTransport(self._client)

    def use_unix(self, path: str | None) -> None:
        """From now on, talk to the server over its Unix socket ``path`` (same host), or
        over TCP again (``None``)."""
        assert self._transport is None and self._client is not None
        self._client.close()
        self.frames.close()
        self._close_shared_memory()
        self.unix = path
        self._open()

    def use_shared_memory(self, info: dict[str, Any]) -> None:
        """Over the Unix socket, opens the server's shared-memory channel when ``info``
        (``/v1/info``) says it has one; else :attr:`shared_memory_why` says why not."""
        offer = info.get("shared_memory") or {}
        if self.unix is None or self._transport is not None:
            return
        if not offer.get("enabled") or not offer.get("socket"):
            self.shared_memory_why = f"the server has it off: {offer.get('why', 'an older server')}"
            return
        try:
            self.shared_memory = SharedMemoryChannel(offer["socket"], self.token.token,
                                                     self.timeout)
            self.shared_memory_why = "on"
        except (OSError, ClientError, WireError) as exc:
            self.shared_memory_why = f"its channel {offer['socket']} failed ({exc})"
            log.info("statehost client: no shared memory, %s; array bytes go through the "
                     "byte stream", self.shared_memory_why)

    def _close_shared_memory(self) -> None:
        if self.shared_memory is not None:
            self.shared_memory.close()
            self.shared_memory = None
            self.shared_memory_why = "closed"

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            raise ClientClosedError(
                f"statehost client for {self.base_url} is closed. "
                "Fix: open a new one with statehost.connect(...)."
            )
        return self._client

    @property
    def closed(self) -> bool:
        return self._client is None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
            self.frames.close()
            self._close_shared_memory()

    def can_stream(self) -> bool:
        """Whether a call stream can open: over the network, or an injected transport that
        serves one (``InProcessTransport.open_stream``)."""
        return self._transport is None or hasattr(self._transport, "open_stream")

    def open_stream(self, path: str) -> Any:
        """A connection to the server's WebSocket ``path`` (see ``client/_stream.py``)."""
        self.client  # raises ClientClosedError after close()  # noqa: B018
        if self._transport is not None:
            return self._transport.open_stream(path, dict(self._headers))
        from statehost.client._stream import WebSocketConnection

        base = "http://localhost" if self.unix is not None else self.base_url
        url = "ws" + base[len("http"):] + path
        with _translate(f"WebSocket {path}", self.base_url, self.timeout):
            return WebSocketConnection(url, dict(self._headers), self.timeout, unix=self.unix)

    def _token_changed(self) -> bool:
        """After a 401: re-reads the token file; True when its token is new (now in use)."""
        token = self.token.reread()
        if token is None:
            return False
        self._headers["authorization"] = f"Bearer {token}"
        self.client.headers["authorization"] = f"Bearer {token}"
        return True

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        what = f"{method} {path}"
        reread = False
        while True:
            with _translate(what, self.base_url, self.timeout):
                response = self.client.request(method, path, **kwargs)
            if response.status_code != 401 or reread or not self._token_changed():
                break
            reread = True
        note = self.token.refusal(reread) if response.status_code == 401 else ""
        _raise_for(response.status_code, response.content, what, note)
        return response.json() if response.content else None

    def frame(self, path: str, message: Message) -> Frame:
        """POSTs a message's frame and decodes the frame that comes back."""
        what = f"POST {path}"
        self.client  # raises ClientClosedError after close()  # noqa: B018
        encoded = message.to_frame()
        channel = self.shared_memory
        if channel is not None and not channel.alive():  # the server restarted: a new one
            self._close_shared_memory()
            self.use_shared_memory(self.json("GET", "/v1/info"))
            channel = self.shared_memory
        if channel is not None:
            with _translate(what, self.base_url, self.timeout):
                encoded = channel.share(encoded)
        headers = {"content-type": CONTENT_TYPE, "content-length": str(encoded.nbytes)}
        if channel is not None:
            headers.update(channel.headers)
        reread = False
        shown = progress.enabled(self.progress)
        # The transport shows a bar for an answer of 64 MiB or more (client/_progress.py).
        watch = progress.DOWNLOAD.set(f"{message.kind} download") if shown else None
        try:
            while True:
                # A small frame goes as one bytes, which the transport sends in the same
                # write as the request head; as a list it took a second write, and a tiny
                # call +1.1 ms.
                chunks = encoded.to_bytes() if encoded.nbytes <= _CHUNK else \
                    encoded.chunks(_CHUNK)
                if shown and encoded.nbytes >= progress.THRESHOLD:
                    chunks = progress.uploading(chunks, encoded.nbytes, f"{message.kind} upload")
                with _translate(what, self.base_url, self.timeout):
                    status, body = self.frames.post_frame(path, chunks, encoded.nbytes,
                                                          headers)
                if status != 401 or reread or not self._token_changed():
                    break
                reread = True
        finally:
            if watch is not None:
                progress.DOWNLOAD.reset(watch)
        note = self.token.refusal(reread) if status == 401 else ""
        _raise_for(status, bytes(body[:65536]) if status >= 400 else b"", what, note)
        try:
            if channel is None:
                return decode(body)
            with _translate(what, self.base_url, self.timeout):
                return decode(body, channel.attach)
        except WireError as exc:
            raise ProtocolError(f"{what}: the server's answer is not a frame ({exc}).") from exc


class _WithHeaders:
    """An injected ``FrameTransport`` plus this client's auth header."""

    def __init__(self, inner: FrameTransport, headers: dict[str, str]):
        self._inner, self._headers = inner, headers

    def post_frame(self, path: str, chunks: Any, nbytes: int,
                   headers: dict[str, str]) -> tuple[int, Any]:
        return self._inner.post_frame(path, chunks, nbytes, {**self._headers, **headers})

    def close(self) -> None:
        """The injected transport is closed by its owner."""
