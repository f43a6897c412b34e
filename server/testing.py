"""``InProcessTransport``: the real app behind an httpx transport, no sockets.

Tests (and notebooks that want a private server) hand it to
``statehost.connect(..., transport=...)``. The app runs on its own event-loop
thread with its lifespan started, exactly as under uvicorn.
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

    def close(self) -> None:
        """Closing an httpx client leaves the app running; see :meth:`shutdown`."""

    def shutdown(self) -> None:
        """Runs the app's shutdown and stops its event-loop thread."""
        self._lifespan.__exit__(None, None, None)
        self._portal_cm.__exit__(None, None, None)
