"""Sending a frame back: one body when small, streamed chunks when large (the OpenAPI
description of frame routes is ``server/openapi.py``'s ``frames``)."""

from __future__ import annotations

from fastapi.responses import Response, StreamingResponse

from statehost.wire import CONTENT_TYPE, Encoded, Message

__all__ = ["frame_response"]

_STREAM_ABOVE = 1 << 20
def frame_response(message: Message | Encoded) -> Response:
    encoded = message.to_frame() if isinstance(message, Message) else message
    if encoded.nbytes <= _STREAM_ABOVE:
        return Response(encoded.to_bytes(), media_type=CONTENT_TYPE)
    return StreamingResponse(
        encoded.chunks(4 << 20),
        media_type=CONTENT_TYPE,
        headers={"content-length": str(encoded.nbytes)},
    )
