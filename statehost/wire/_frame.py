"""Frames: the bytes of one request or response body.

A frame is::

    b"SHF1" | u32 header length | JSON header | u32 buffer count | (u64 length, bytes)*

The header is a JSON object with the message's fields, the sender's versions
(``versions``) and where each *section* starts (``sections``: name -> [first
buffer, buffer count]). A section (``_pickle.Section``) is one pickle followed by
its out-of-band buffers, so arrays are never copied into one big ``bytes`` or
encoded as text. All integers are little-endian.

Decoding copies nothing and refuses, with one :class:`WireError` per fault,
anything that is not a well-formed frame: bad magic, lengths that overrun the
body, a header that is not a JSON object, too large or nested too deep.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from statehost._errors import WireError
from statehost.wire._pickle import Section
from statehost.wire._versions import local_versions

__all__ = [
    "CONTENT_TYPE",
    "MAGIC",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_DEPTH",
    "Encoded",
    "Frame",
    "decode",
    "decode_all",
    "encode",
    "fresh_buffer",
]

MAGIC = b"SHF1"
CONTENT_TYPE = "application/vnd.statehost.frame"
# A header lists state ids and small metadata; 8 MiB holds ~200k ids. Deeper nesting
# than this is never produced by statehost and would only exhaust the JSON parser.
MAX_HEADER_BYTES = 8 << 20
MAX_HEADER_DEPTH = 8

_SEPARATORS = (",", ":")
# What json.dumps(..., separators=_SEPARATORS) uses, made once: json.dumps makes a new
# encoder on every call that passes options.
_COMPACT = json.JSONEncoder(separators=_SEPARATORS)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Pieces smaller than this are coalesced into one chunk when streaming.
_SMALL = 64 * 1024


def fresh_buffer(nbytes: int) -> memoryview:
    """A writable buffer for a body of ``nbytes``: ``np.empty``, not ``bytearray(n)``.

    ``bytearray`` zero-fills, and numpy asks Linux for transparent huge pages on
    large allocations, so filling a fresh 128 MiB buffer took 64 ms as a
    ``bytearray`` and 11 ms as ``np.empty`` on a 2-core machine.
    """
    import numpy as np

    return memoryview(np.empty(nbytes, np.uint8))


class Encoded:
    """An encoded frame as a list of pieces; stream it with :meth:`chunks`."""

    def __init__(self, pieces: list[Any], nbytes: int | None = None):
        self.pieces = pieces
        self.nbytes = sum(memoryview(p).nbytes for p in pieces) if nbytes is None else nbytes

    def chunks(self, size: int = 1 << 20) -> Iterator[bytes | memoryview]:
        """Yields the frame in pieces of at most ``size`` bytes, small pieces coalesced."""
        pending = bytearray()
        for piece in self.pieces:
            view = memoryview(piece).cast("B")
            if view.nbytes < _SMALL:
                pending += view
                if len(pending) >= size:
                    yield bytes(pending)
                    pending = bytearray()
                continue
            if pending:
                yield bytes(pending)
                pending = bytearray()
            for start in range(0, view.nbytes, size):
                yield view[start : start + size]
        if pending:
            yield bytes(pending)

    def to_bytes(self) -> bytes:
        """The whole frame as one ``bytes`` (fine for small frames; large ones: ``chunks``)."""
        return b"".join(p if type(p) is bytes else memoryview(p).cast("B") for p in self.pieces)


@functools.cache
def _versions_json() -> str:
    """This process's versions as JSON: the same in every frame, so encoded once."""
    return _COMPACT.encode(local_versions())


def encode(header: Mapping[str, Any], sections: Mapping[str, Section] | None = None) -> Encoded:
    """Encodes a frame: ``header`` plus the sender's versions and the sections' layout."""
    layout: dict[str, list[int]] = {}
    buffers: list[Any] = []
    for name, section in (sections or {}).items():
        layout[name] = [len(buffers), 1 + len(section.buffers)]
        buffers.append(section.payload)
        buffers.extend(section.buffers)
    if header and "versions" not in header and "sections" not in header:
        # The bytes json.dumps gives for {**header, "versions": ..., "sections": ...}, with
        # the versions' JSON made once per process rather than once per frame.
        text = _COMPACT.encode(header if type(header) is dict else dict(header))
        head = (f'{text[:-1]},"versions":{_versions_json()},"sections":'
                f"{_COMPACT.encode(layout)}}}").encode()
    else:
        full = dict(header)
        full["versions"] = local_versions()
        full["sections"] = layout
        head = _COMPACT.encode(full).encode()
    pieces: list[Any] = [MAGIC + _U32.pack(len(head)) + head + _U32.pack(len(buffers))]
    nbytes = len(pieces[0])
    for buf in buffers:
        size = memoryview(buf).nbytes
        pieces.append(_U64.pack(size))
        pieces.append(buf)
        nbytes += 8 + size
    return Encoded(pieces, nbytes)


@dataclass
class Frame:
    """A decoded frame: the JSON header and views of its sections' buffers (no copies)."""

    header: dict[str, Any]
    sections: dict[str, Section]
    #: bytes of each section that came in shared memory, not in the body (``_shared_memory``)
    shared_nbytes: dict[str, int] = dataclasses.field(default_factory=dict)

    def section_nbytes(self, name: str) -> int:
        """The bytes of section ``name`` that travelled in the body."""
        section = self.sections.get(name)
        return 0 if section is None else section.nbytes - self.shared_nbytes.get(name, 0)


def _fail(what: str) -> WireError:
    return WireError(
        f"statehost wire: {what}. The body is not a valid statehost frame "
        f"(b'SHF1' | u32 header length | JSON header | u32 buffer count | (u64 length, bytes)*). "
        "Fix: send frames built by statehost's client, and send the whole body."
    )


def _too_deep(value: Any) -> bool:
    """Whether parsed JSON nests lists/objects deeper than ``MAX_HEADER_DEPTH``.

    Checked on the parsed header, one level at a time (a few microseconds for a real
    one); the JSON parser itself refuses absurd depths with RecursionError. Parsed JSON
    holds only exact ``dict``s and ``list``s, so ``type(...) in`` suffices.
    """
    level, depth = [value], 1
    while level:
        below = []
        for node in level:
            below += [c for c in (node.values() if type(node) is dict else node)
                      if type(c) in _CONTAINERS]
        if below and depth == MAX_HEADER_DEPTH:
            return True
        level, depth = below, depth + 1
    return False


_CONTAINERS = (dict, list)


#: ``attach(arena id, nbytes)``: the bytes of a buffer a frame names in shared memory.
Attach = Callable[[str, int], memoryview]


def decode(data: bytes | bytearray | memoryview, attach: Attach | None = None) -> Frame:
    """Decodes a frame without copying its buffers; raises ``WireError`` if malformed.

    ``attach`` resolves the buffers the header names in shared memory (its ``"shm"``
    field, ``_shared_memory.py``); without it such a frame is refused.
    """
    view = memoryview(data).cast("B")
    frame, end = _decode_at(view, 0, attach)
    if end != view.nbytes:
        raise _fail(f"{view.nbytes - end} bytes follow the last buffer")
    return frame


def decode_all(data: bytes | bytearray | memoryview) -> list[Frame]:
    """Decodes one or more frames laid end to end (the call stream sends several replies
    in one WebSocket message when they are ready together); ``WireError`` if malformed.

    Each frame is self-delimiting (its header and buffer lengths say where it ends), so
    a single frame decodes exactly as :func:`decode` does.
    """
    view = memoryview(data).cast("B")
    frames, pos, total = [], 0, view.nbytes
    while True:
        frame, pos = _decode_at(view, pos)
        frames.append(frame)
        if pos == total:
            return frames


def _decode_at(view: memoryview, start: int, attach: Attach | None = None
               ) -> tuple[Frame, int]:
    """The frame starting at byte ``start`` of ``view``, and where it ends."""
    total = view.nbytes
    if total - start < 8:
        raise _fail(f"the body has {total - start} bytes, fewer than the 8-byte preamble")
    if view[start:start + 4] != MAGIC:
        raise _fail(f"the body starts with {bytes(view[start:start + 4])!r}, not {MAGIC!r}")
    (head_len,) = _U32.unpack_from(view, start + 4)
    if head_len > MAX_HEADER_BYTES:
        raise _fail(f"the header claims {head_len} bytes, more than the limit of "
                    f"{MAX_HEADER_BYTES}")
    pos = start + 8 + head_len
    if pos + 4 > total:
        raise _fail(f"the header claims {head_len} bytes but the body has only "
                    f"{total - start}")
    text = bytes(view[start + 8:pos])
    try:
        header = json.loads(text)
    except RecursionError as exc:
        raise _fail(f"the header nests deeper than {MAX_HEADER_DEPTH} levels") from exc
    # ValueError: JSONDecodeError, UnicodeDecodeError, and an integer literal of more than
    # sys.get_int_max_str_digits() digits (4300), which json.loads refuses with a bare ValueError.
    except ValueError as exc:
        raise _fail(f"the header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _fail(f"the header is a JSON {type(header).__name__}, not an object")
    # JSON cannot nest deeper than it has brackets: most headers need no walk at all.
    if text.count(b"[") + text.count(b"{") > MAX_HEADER_DEPTH and _too_deep(header):
        raise _fail(f"the header nests deeper than {MAX_HEADER_DEPTH} levels")
    (count,) = _U32.unpack_from(view, pos)
    pos += 4
    buffers = []
    for index in range(count):
        if pos + 8 > total:
            raise _fail(f"the body ends before the length of buffer {index} of {count}")
        (size,) = _U64.unpack_from(view, pos)
        pos += 8
        if pos + size > total:
            raise _fail(
                f"buffer {index} claims {size} bytes but only {total - pos} remain (truncated?)"
            )
        buffers.append(view[pos : pos + size])
        pos += size
    layout = header.get("sections", {})
    if not isinstance(layout, dict) or not all(
        type(v) is list and len(v) == 2 and type(v[0]) is int and type(v[1]) is int
        and 0 <= v[0] and 1 <= v[1] and v[0] + v[1] <= count
        for v in layout.values()
    ):
        raise _fail(f"the header's sections {layout!r:.200} do not fit {count} buffers")
    shared = _attach(header, buffers, attach) if "shm" in header else None
    sections = {name: Section(buffers[first], buffers[first + 1 : first + n])
                for name, (first, n) in layout.items()}
    frame = Frame(header, sections)
    if shared:
        for name, (first, n) in layout.items():
            inside = sum(size for index, size in shared.items() if first <= index < first + n)
            if inside:
                frame.shared_nbytes[name] = inside
    return frame, pos


def _attach(header: dict[str, Any], buffers: list[memoryview], attach: Attach | None
            ) -> dict[int, int]:
    """Puts the buffers the header names in shared memory in place; index -> nbytes."""
    named = header["shm"]
    if attach is None:
        raise _fail("the header names buffers in shared memory, which only a client on the "
                    "server's host sends, over the Unix socket with its shared-memory channel "
                    "open")
    if not isinstance(named, dict) or not all(
        type(k) is str and k.isdigit() and int(k) < len(buffers) and buffers[int(k)].nbytes == 0
        and type(v) is list and len(v) == 2 and type(v[0]) is str and type(v[1]) is int
        and v[1] >= 0 for k, v in named.items()
    ):
        raise _fail(f"the header's shm field {named!r:.200} does not name empty buffers of "
                    f"the {len(buffers)} as [arena, nbytes]")
    sizes = {}
    for key, (arena, nbytes) in named.items():
        buffers[int(key)] = attach(arena, nbytes)
        sizes[int(key)] = nbytes
    return sizes
