"""``WebSocket /v1/stream``: one client's ordered call stream (see ``server/stream.py``)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, WebSocket

from statehost.server.deps import authenticate
from statehost.server.errors import ApiError, ForbiddenError
from statehost.server.stream import WHERE, Channel, ChannelClosed, error_frame

router = APIRouter(tags=["calls"])


@router.websocket("/v1/stream")
async def stream(websocket: WebSocket) -> None:
    """Frames in, frames out, in order; auth as every route (a bearer token, scope submit).

    A refused token still gets an answer it can read: the ``ErrorReply`` frame, then a
    close with code 1008 and the reason.
    """
    app = websocket.app
    rt = app.state.runtime
    try:
        principal = authenticate(websocket.headers.get("authorization", ""),
                                 app.state.settings, rt, WHERE)
        if not principal.has("submit"):
            raise ForbiddenError(f"{WHERE}: this token has scope {principal.scope!r}; sending "
                                 "code needs 'submit'. Fix: use a token made with --scope "
                                 "submit.")
    except ApiError as exc:
        await websocket.accept()
        await websocket.send_bytes(error_frame(exc))
        await websocket.close(code=1008, reason=_reason(exc.message))
        return
    await websocket.accept()
    channel = Channel(rt, principal, app.state.versions, websocket.send_bytes)
    runner = asyncio.create_task(channel.run())
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            data = message.get("bytes")
            if data is None:
                raise ChannelClosed(1003, f"{WHERE}: text messages are not accepted; send "
                                    "frames as binary messages.")
            channel.receive(data)
    except ChannelClosed as exc:
        channel.close()
        await websocket.close(code=exc.code, reason=_reason(exc.reason))
    finally:
        channel.close()
        await runner  # a call already running finishes (and commits) on its worker


def _reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8 (RFC 6455, 5.5)."""
    data = text.encode()[:123]
    return data.decode(errors="ignore")
