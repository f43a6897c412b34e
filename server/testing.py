"""``InProcessTransport``: the real app in this process, no sockets.

Tests (and notebooks that want a private server) hand it to
``statehost.connect(..., transport=...)``. The app runs on its own event-loop
thread with its lifespan started, exactly as under uvicorn. It serves the
client's JSON requests as an httpx transport, its frames as a
``statehost.client`` ``FrameTransport`` (``post_frame``: the same chunks, the
same status handling and decoding as over a socket), and its call stream as a
WebSocket connection (``open_stream``: the app's own WebSocket route, through
ASGI messages). The server never imports the client: the protocols are structural.
"""

from __future__ import annotations

import asyncio
import queue
from typing import Any

import anyio.from_thread
import httpx

__all__ = ["InProcessTransport"]


class InProcessTransport(httpx.BaseTransport):
    """Serves httpx requests from an ASGI ``app``; call :meth:`shutdown` when done.

    Example:
        >>> from statehost.server import Settings, create_app
        >>> import tempfile
        >>> app = create_app(Settings(tokens=("t",), data_dir=tempfile.mkdtemp()))
        >>> transport = InProcessTransport(app)
        >>> httpx.Client(transport=transport).get("http://x/v1/health").json()
        {'status': 'ok'}
        >>> transport.shutdown()
    """

    def __init__(self, app: Any):
        self.app = app
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._asgi = httpx.ASGITransport(app)
        self._lifespan = self._portal.wrap_async_context_manager(
            app.router.lifespan_context(app)
        )
        self._lifespan.__enter__()
        self._sockets: list[_InProcessSocket] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()

        async def send() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            copy = httpx.Request(request.method, request.url, headers=request.headers,
                                 content=body)
            response = await self._asgi.handle_async_request(copy)
            content = await response.aread()
            return response.status_code, response.headers.raw, content

        status, headers, content = self._portal.call(send)
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(content))

    def post_frame(self, path: str, chunks: Any, nbytes: int,
                   headers: dict[str, str]) -> tuple[int, bytes]:
        """Sends a frame's chunks to the app; returns its status and whole body."""
        pieces = [bytes(chunks)] if isinstance(chunks, bytes | bytearray | memoryview) \
            else [bytes(c) for c in chunks]

        async def body() -> Any:
            for piece in pieces:
                yield piece

        async def send() -> tuple[int, bytes]:
            request = httpx.Request("POST", f"http://statehost.in-process{path}",
                                    headers=headers, content=body())
            response = await self._asgi.handle_async_request(request)
            return response.status_code, await response.aread()

        return self._portal.call(send)

    def open_stream(self, path: str, headers: dict[str, str]) -> _InProcessSocket:
        """A WebSocket connection to the app's ``path`` (``send``, ``recv``, ``close``)."""
        socket = _InProcessSocket(self._portal, self.app, path, headers)
        self._sockets.append(socket)
        return socket

    def close(self) -> None:
        """Closing an httpx client leaves the app running; see :meth:`shutdown`."""

    def shutdown(self) -> None:
        """Closes the sockets still open (their app tasks end), runs the app's shutdown
        and stops its event-loop thread."""
        for socket in self._sockets:
            socket.close()
        self._lifespan.__exit__(None, None, None)
        self._portal_cm.__exit__(None, None, None)


class _InProcessSocket:
    """One WebSocket session with the app: ASGI ``websocket`` messages through queues.

    ``recv`` returns ``None`` once the app closed the socket (``close_code``,
    ``close_reason`` say how), as ``statehost.client``'s stream expects.
    """

    def __init__(self, portal: Any, app: Any, path: str, headers: dict[str, str]):
        self._portal = portal
        self._out: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.close_code: int | None = None
        self.close_reason = ""

        async def start() -> tuple[asyncio.AbstractEventLoop, asyncio.Queue]:
            inbox: asyncio.Queue = asyncio.Queue()
            inbox.put_nowait({"type": "websocket.connect"})
            return asyncio.get_running_loop(), inbox

        self._loop, self._in = portal.call(start)
        scope = {
            "type": "websocket", "asgi": {"version": "3.0"}, "scheme": "ws", "path": path,
            "raw_path": path.encode(), "root_path": "", "query_string": b"",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
            "client": ("127.0.0.1", 0), "server": ("statehost.in-process", 80),
            "subprotocols": [], "state": {},
        }

        async def receive() -> dict[str, Any]:
            return await self._in.get()

        async def send(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "websocket.send":
                data = message.get("bytes")
                self._out.put(("data", data if data is not None else message["text"].encode()))
            elif kind == "websocket.close":
                self._out.put(("close", (message.get("code", 1000), message.get("reason", ""))))
            elif kind == "websocket.accept":
                self._out.put(("accept", None))

        async def run() -> None:
            try:
                await app(scope, receive, send)
            finally:
                self._out.put(("close", (1006, "the app ended the connection")))

        self._task = portal.start_task_soon(run)
        kind, payload = self._out.get(timeout=30)
        if kind == "close":
            self._closed(payload)
            self._pushback = ("close", payload)
        else:
            self._pushback = None

    def _closed(self, payload: tuple[int, str]) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = payload

    def send(self, data: bytes) -> None:
        if self.close_code is not None:
            raise ConnectionResetError(f"closed ({self.close_code}: {self.close_reason})")
        self._loop.call_soon_threadsafe(
            self._in.put_nowait, {"type": "websocket.receive", "bytes": bytes(data)})

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next message; ``None`` once closed. ``queue.Empty`` past ``timeout``."""
        if self._pushback is not None:
            kind, payload = self._pushback
            self._pushback = None
        else:
            kind, payload = self._out.get(timeout=timeout)
        while kind == "accept":
            kind, payload = self._out.get()
        if kind == "close":
            self._closed(payload)
            return None
        return payload

    def close(self) -> None:
        if self.close_code is None:
            self._loop.call_soon_threadsafe(
                self._in.put_nowait, {"type": "websocket.disconnect", "code": 1000})
            self._closed((1000, "closed by the client"))
        self._out.put(("close", (1000, "closed by the client")))
