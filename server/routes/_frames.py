"""Sending a frame back: one body when small, streamed chunks when large, and the large
buffers in shared memory when the request came with a channel (``server/shared_memory.py``;
the OpenAPI description of frame routes is ``server/openapi.py``'s ``frames``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi.responses import Response, StreamingResponse

from statehost.server import shared_memory
from statehost.wire import CONTENT_TYPE, Encoded, Message

__all__ = ["frame_response", "stream_nbytes"]

_STREAM_ABOVE = 1 << 20
#: The bytes of an answer's section that go through the byte stream (for
#: ``statehost_wire_bytes_total``; buffers in shared memory are counted apart).
stream_nbytes = shared_memory.stream_nbytes


def frame_response(message: Message | Encoded) -> Response:
    encoded = message.to_frame() if isinstance(message, Message) else message
    planned = shared_memory.reply(encoded)
    if planned is not None:
        encoded, fill = planned
        # Starlette iterates a plain iterator in its thread pool: the copies into the
        # arenas run off the event loop, and before the first byte of the answer.
        return StreamingResponse(_filled_first(encoded, fill), media_type=CONTENT_TYPE,
                                 headers={"content-length": str(encoded.nbytes)})
    if encoded.nbytes <= _STREAM_ABOVE:
        return Response(encoded.to_bytes(), media_type=CONTENT_TYPE)
    return StreamingResponse(
        encoded.chunks(4 << 20),
        media_type=CONTENT_TYPE,
        headers={"content-length": str(encoded.nbytes)},
    )


def _filled_first(encoded: Encoded, fill: Callable[[], None]) -> Iterator[Any]:
    fill()
    yield from encoded.chunks(4 << 20)
