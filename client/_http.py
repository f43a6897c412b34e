"""HTTP for the client: JSON through httpx, frames through a ``FrameTransport``, and the
one mapping from transport failures and error answers to the client's exceptions.

Large request bodies go out as 1 MiB memoryview chunks with a Content-Length;
large responses are read into one preallocated buffer, never joined from pieces.
"""

from __future__ import annotations

import contextlib
import http.client
import json
from collections.abc import Iterator
from typing import Any

import httpx

from statehost._errors import WireError
from statehost.client._errors import (
    BY_TYPE,
    ClientClosedError,
    ProtocolError,
    RemoteExecutionError,
    ServerError,
    TransportError,
    remote_execution_error,
)
from statehost.client._transport import FrameTransport, HttpxFrameTransport, StdlibFrameTransport
from statehost.wire import CONTENT_TYPE, Frame, Message, decode

__all__ = ["Http"]

_CHUNK = 1 << 20


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


def _raise_for(status: int, body: bytes, what: str) -> None:
    """Raises the client exception of an error answer's kind (by its ``type``)."""
    if status < 400:
        return
    try:
        error = json.loads(body)["error"]
        kind, message = str(error["type"]), str(error["message"])
    except Exception:
        error, kind = {}, ""
        message = f"HTTP {status}: {body[:500]!r}"
    cls = BY_TYPE.get(kind)
    if cls is None:
        cls = ServerError if status >= 500 else ProtocolError
    text = message if message.startswith(what) else f"{what}: {message}"
    if error.get("traceback"):
        text += f"\n\nRemote traceback:\n{error['traceback']}"
    if cls is RemoteExecutionError:
        raise remote_execution_error(text, status=status, body=error)
    raise cls(text, status=status, body=error)


class Http:
    """The client's connection: JSON requests and frames, with statehost's errors."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        timeout: float,
        transport: httpx.BaseTransport | None,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self._client: httpx.Client | None = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=4),
            transport=transport,
        )
        if transport is None:
            self.frames: FrameTransport = StdlibFrameTransport(self.base_url, headers, timeout)
        elif isinstance(transport, FrameTransport):
            self.frames = _WithHeaders(transport, headers)
        else:
            self.frames = HttpxFrameTransport(self._client)

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

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        what = f"{method} {path}"
        with _translate(what, self.base_url, self.timeout):
            response = self.client.request(method, path, **kwargs)
        _raise_for(response.status_code, response.content, what)
        return response.json() if response.content else None

    def frame(self, path: str, message: Message) -> Frame:
        """POSTs a message's frame and decodes the frame that comes back."""
        what = f"POST {path}"
        encoded = message.to_frame()
        headers = {"content-type": CONTENT_TYPE, "content-length": str(encoded.nbytes)}
        chunks = [encoded.to_bytes()] if encoded.nbytes <= _CHUNK else encoded.chunks(_CHUNK)
        self.client  # raises ClientClosedError after close()  # noqa: B018
        with _translate(what, self.base_url, self.timeout):
            status, body = self.frames.post_frame(path, chunks, encoded.nbytes, headers)
        _raise_for(status, bytes(body[:65536]) if status >= 400 else b"", what)
        try:
            return decode(body)
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
