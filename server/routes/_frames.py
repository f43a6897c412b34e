"""Frames in the OpenAPI document, and sending a frame back: one body when small, streamed
chunks when large."""

from __future__ import annotations

from fastapi.responses import Response, StreamingResponse

from statehost.wire import CONTENT_TYPE, Encoded, Message

__all__ = ["FRAME_OPENAPI", "frame_response"]

_STREAM_ABOVE = 1 << 20
_BINARY = {"schema": {"type": "string", "format": "binary"}}

#: ``openapi_extra`` of a route that takes a frame and answers one: the OpenAPI document
#: lists these routes with their content type, though only statehost's client (or code
#: built on ``statehost.wire``) speaks it.
FRAME_OPENAPI = {
    "requestBody": {"required": True, "description": "a statehost.wire frame",
                    "content": {CONTENT_TYPE: _BINARY}},
    "responses": {"200": {"description": "a statehost.wire frame",
                          "content": {CONTENT_TYPE: _BINARY}}},
}


def frame_response(message: Message | Encoded) -> Response:
    encoded = message.to_frame() if isinstance(message, Message) else message
    if encoded.nbytes <= _STREAM_ABOVE:
        return Response(encoded.to_bytes(), media_type=CONTENT_TYPE)
    return StreamingResponse(
        encoded.chunks(4 << 20),
        media_type=CONTENT_TYPE,
        headers={"content-length": str(encoded.nbytes)},
    )
