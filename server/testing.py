"""``InProcessTransport``: the real app in this process, no sockets.

Tests (and notebooks that want a private server) hand it to
``statehost.connect(..., transport=...)``. The app runs on its own event-loop
thread with its lifespan started, exactly as under uvicorn. It serves the
client's JSON requests as an httpx transport and its frames as a
``statehost.client`` ``FrameTransport`` (``post_frame``: the same chunks, the
same status handling and decoding as over a socket). The server never imports
the client: the protocol is structural.
"""

from __future__ import annotations

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

    def close(self) -> None:
        """Closing an httpx client leaves the app running; see :meth:`shutdown`."""

    def shutdown(self) -> None:
        """Runs the app's shutdown and stops its event-loop thread."""
        self._lifespan.__exit__(None, None, None)
        self._portal_cm.__exit__(None, None, None)
