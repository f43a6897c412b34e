"""The wire format shared by the client and the server: frames and pickled sections.

A frame is one request or response body::

    b"SHF1" | u32 header length | JSON header | u32 buffer count | (u64 length, bytes)*

The header is a JSON object with the message's metadata, the sender's versions
(``versions``) and where each *section* starts (``sections``: name -> [first
buffer, buffer count]). A section is one pickle (protocol 5, cloudpickle) whose
array data travels as out-of-band buffers right after it, so arrays are never
copied into one big ``bytes`` object or encoded as text.

``State`` objects inside a pickled section become references (``state_ref``);
the receiver's ``persistent_load`` turns each reference into its own ``State``.
All integers are little-endian. Pure Python + numpy + cloudpickle.
"""

from __future__ import annotations

import io
import json
import pickle
import platform
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from statehost._errors import WireError
from statehost._state import State

__all__ = [
    "CONTENT_TYPE",
    "MAGIC",
    "PROTOCOL",
    "Encoded",
    "Frame",
    "Section",
    "decode",
    "encode",
    "fresh_buffer",
    "local_versions",
    "pack",
    "state_ref",
    "unpack",
    "version_problems",
]

MAGIC = b"SHF1"
PROTOCOL = 1
CONTENT_TYPE = "application/vnd.statehost.frame"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Pieces smaller than this are coalesced into one chunk when streaming.
_SMALL = 64 * 1024

StateRef = tuple[str, str, type, "str | None", "str | None"]


# -- versions -----------------------------------------------------------------
def local_versions() -> dict[str, Any]:
    """The versions this process speaks: protocol, Python, jax, cloudpickle, statehost."""
    import jax

    from statehost import __version__

    return {
        "protocol": PROTOCOL,
        "python": ".".join(platform.python_version_tuple()[:2]),
        "jax": jax.__version__,
        "cloudpickle": cloudpickle.__version__,
        "statehost": __version__,
    }


def _part(version: Any, n: int) -> str:
    return ".".join(str(version).split(".")[:n])


# What must agree for pickles to travel: (name, how many version components).
_MUST_MATCH = (("protocol", 1), ("python", 2), ("cloudpickle", 1), ("jax", 2))


def version_problems(
    mine: Mapping[str, Any], theirs: Mapping[str, Any], *, me: str, them: str
) -> list[str]:
    """Lines naming each version that must match but does not (empty when compatible).

    Python minor, cloudpickle major, jax minor and the protocol must agree:
    pickled code and arrays do not survive a change of any of them.
    """
    problems = []
    for name, n in _MUST_MATCH:
        a, b = _part(mine.get(name, "?"), n), _part(theirs.get(name, "?"), n)
        if a != b:
            problems.append(
                f"{name}: {me} has {mine.get(name, 'unknown')}, "
                f"{them} has {theirs.get(name, 'unknown')}"
            )
    return problems


# -- sections: pickles with out-of-band buffers --------------------------------
@dataclass
class Section:
    """One pickle and its out-of-band buffers; ``states`` lists the States it refers to."""

    payload: bytes
    buffers: list[memoryview] = field(default_factory=list)
    states: list[State] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return len(self.payload) + sum(b.nbytes for b in self.buffers)


def state_ref(state: State) -> StateRef:
    """How a ``State`` travels inside a pickle: id, class, name and tag, never its value."""
    return ("state", state.id, type(state), state.name, state.tag)


class _RefPickler(cloudpickle.Pickler):
    """A cloudpickle pickler that turns every ``State`` into ``state_ref(state)``."""

    def __init__(self, file: io.BytesIO, buffer_callback: Callable[[Any], Any] | None):
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self.seen: dict[str, State] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, State):
            self.seen.setdefault(obj.id, obj)
            return state_ref(obj)
        return None


def pack(obj: Any, *, refs: bool = True, code: bool = True, oob: bool = True) -> Section:
    """Pickles ``obj`` (protocol 5, cloudpickle) with array data out of band.

    Arguments:
        obj: anything cloudpickle can pickle. Convert ``jax.Array`` leaves to
            numpy first (``jax.device_get``) so their data travels out of band.
        refs: replace ``State`` objects by references (``state_ref``); when
            False, a State is pickled whole, value included.
        code: pickle with cloudpickle (functions and classes by value). With
            False, data is pickled by the standard C pickler, about twice as
            fast; cloudpickle is still used if that fails.
        oob: send array data out of band; False keeps everything in one pickle
            (for payloads stored as one blob).

    Returns:
        A :class:`Section`; ``states`` holds the States met, in pickling order.
    """
    buffers: list[memoryview] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        buffers.append(buf.raw())
        return False

    file = io.BytesIO()
    if refs:
        pickler = _RefPickler(file, keep if oob else None)
        pickler.dump(obj)
        return Section(file.getvalue(), buffers, list(pickler.seen.values()))
    if not code:
        try:
            pickle.Pickler(file, protocol=5, buffer_callback=keep).dump(obj)
            return Section(file.getvalue(), buffers)
        except (pickle.PicklingError, AttributeError, TypeError):
            file, buffers[:] = io.BytesIO(), []
    cloudpickle.Pickler(file, protocol=5, buffer_callback=keep).dump(obj)
    return Section(file.getvalue(), buffers)


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, buffers: Sequence[Any], load_state: Callable[[Any], Any]):
        super().__init__(file, buffers=buffers)
        self._load_state = load_state

    def persistent_load(self, pid: Any) -> Any:
        return self._load_state(pid)


def _no_states(pid: Any) -> Any:
    raise WireError(
        f"statehost wire: the payload refers to a State ({pid!r:.80}) where none may appear. "
        "Fix: send state values, not State objects, in this message."
    )


def unpack(buffers: Sequence[memoryview], load_state: Callable[[Any], Any] | None = None) -> Any:
    """Unpickles a section (its pickle, then its out-of-band buffers).

    ``load_state`` receives each ``state_ref`` tuple and returns the object to
    use in its place. Unpickling runs code: only call it on authenticated input.
    """
    payload, rest = buffers[0], buffers[1:]
    return _RefUnpickler(io.BytesIO(payload), rest, load_state or _no_states).load()


# -- frames -------------------------------------------------------------------
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

    def __init__(self, pieces: list[Any]):
        self.pieces = pieces
        self.nbytes = sum(memoryview(p).nbytes for p in pieces)

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
        return b"".join(memoryview(p).cast("B") for p in self.pieces)


def encode(header: Mapping[str, Any], sections: Mapping[str, Section] | None = None) -> Encoded:
    """Encodes a frame: ``header`` plus the sender's versions and the sections' layout."""
    full = dict(header)
    full["versions"] = local_versions()
    layout: dict[str, list[int]] = {}
    buffers: list[Any] = []
    for name, section in (sections or {}).items():
        layout[name] = [len(buffers), 1 + len(section.buffers)]
        buffers.append(section.payload)
        buffers.extend(section.buffers)
    full["sections"] = layout
    head = json.dumps(full, separators=(",", ":")).encode()
    pieces: list[Any] = [MAGIC + _U32.pack(len(head)) + head + _U32.pack(len(buffers))]
    for buf in buffers:
        pieces.append(_U64.pack(memoryview(buf).nbytes))
        pieces.append(buf)
    return Encoded(pieces)


@dataclass
class Frame:
    """A decoded frame: the JSON header and memoryviews of its buffers (no copies)."""

    header: dict[str, Any]
    buffers: list[memoryview]

    def has(self, name: str) -> bool:
        return name in self.header.get("sections", {})

    def section_buffers(self, name: str) -> list[memoryview]:
        first, count = self.header["sections"][name]
        return self.buffers[first : first + count]

    def section_nbytes(self, name: str) -> int:
        if not self.has(name):
            return 0
        return sum(b.nbytes for b in self.section_buffers(name))

    def section(self, name: str, load_state: Callable[[Any], Any] | None = None) -> Any:
        """Unpickles section ``name`` (``None`` when the frame has no such section)."""
        if not self.has(name):
            return None
        return unpack(self.section_buffers(name), load_state)


def _fail(what: str) -> WireError:
    return WireError(
        f"statehost wire: {what}. The body is not a valid statehost frame "
        f"(b'SHF1' | u32 header length | JSON header | u32 buffer count | (u64 length, bytes)*). "
        "Fix: send frames built by statehost's client, and send the whole body."
    )


def decode(data: bytes | bytearray | memoryview) -> Frame:
    """Decodes a frame without copying its buffers; raises ``WireError`` if malformed."""
    view = memoryview(data).cast("B")
    total = view.nbytes
    if total < 8:
        raise _fail(f"the body has {total} bytes, fewer than the 8-byte preamble")
    if bytes(view[:4]) != MAGIC:
        raise _fail(f"the body starts with {bytes(view[:4])!r}, not {MAGIC!r}")
    (head_len,) = _U32.unpack_from(view, 4)
    pos = 8 + head_len
    if pos + 4 > total:
        raise _fail(f"the header claims {head_len} bytes but the body has only {total}")
    try:
        header = json.loads(bytes(view[8:pos]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(f"the header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise _fail(f"the header is a JSON {type(header).__name__}, not an object")
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
    if pos != total:
        raise _fail(f"{total - pos} bytes follow the last buffer")
    sections = header.get("sections", {})
    if not isinstance(sections, dict) or not all(
        isinstance(v, list) and len(v) == 2 and 0 <= v[0] and 1 <= v[1] and v[0] + v[1] <= count
        for v in sections.values()
    ):
        raise _fail(f"the header's sections {sections!r:.200} do not fit {count} buffers")
    return Frame(header, buffers)
