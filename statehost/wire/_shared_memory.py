"""Shared memory for a frame's large buffers, between a client and a server on one host.

Over the Unix socket, an array buffer of at least a threshold size (1 MiB by default)
does not travel through the HTTP byte stream. The sender copies it into an *arena*, an
anonymous memory file of its own (``memfd_create``), and the frame names the arena
instead of carrying the bytes; the receiver maps the arena once and hands numpy a view
of it (no copy: ``jax.device_put`` copies it to the device, as it copies any numpy
array). This module holds what both sides do alike; the channels are
``server/shared_memory.py`` and ``client/_shared_memory.py``.

Lifetime. Arenas are files with no name: they exist only as descriptors and mappings,
so they die with the last process that holds one and nothing is ever left in
``/dev/shm``, whatever signal ends either side. Their descriptors travel with
``SCM_RIGHTS`` on a channel of their own (HTTP goes through uvicorn, which reads its
socket without ancillary data, so descriptors sent there would be dropped): a
``SOCK_SEQPACKET`` Unix socket next to the HTTP one, one connection per client. Each
side keeps a table of the peer's arenas per connection and closes every one of them
when the connection closes, so a killed peer leaks nothing in the survivor.

Reuse. A fresh memory file costs a page fault per 4 KiB page on first write (0.8 GB/s
for 128 MiB on a 2-core machine, against 16 GB/s for a copy into pages already there),
so an arena is not thrown away after one use: the receiver *leases* the bytes it maps
(a view whose last reference, when dropped, sends ``release``), and the sender fills a
released arena again. Only the first use of an arena sends its descriptor; the
receiver keeps its mapping, so later uses fault no page on either side. An arena the
peer still leases is never written.

Cost of an upload. On CPU devices an upload is two copies: into the client's arena, and
out of it into the server's own memory (``jax.device_put`` aliases page-aligned host
memory there, and a state must not live in pages the client can still write). On an
accelerator it is one: the arena's view goes to ``device_put`` as it is. Where one copy
already takes the host's whole memory bandwidth (2 cores: two copies side by side each
ran at half the rate of one), two copies stay under half the host memcpy rate however
they overlap. Measured and rejected as ways to one copy (128 MiB, 2 cores, memcpy 14
GB/s): a fresh memory file per upload, sealed against writes (``F_SEAL_WRITE``) so the
server could keep its pages, faults them in at 1.0-1.2 GB/s; ``vmsplice`` of the
client's buffer into a pipe the server reads (the only copy is the read) ran at 6.4 GB/s
(0.45x memcpy; the two copies: 5-6 GB/s), not worth a pipe and a thread per upload.

Safety. The receiver refuses an arena that is smaller than announced or not sealed
against shrinking (``F_SEAL_SHRINK``): a peer that truncated a mapped file would kill
the receiver with SIGBUS on its next read.

Channel messages are JSON objects, one per packet, descriptors attached to the packet
that announces them:

========================================  =============================================
``{"op": "auth", "token": T}``            client, first: the same bearer token as HTTP
``{"op": "ok", "channel": C, ...}``       server: the channel id HTTP requests name
                                          (header ``x-statehost-shm``)
``{"op": "refused", "error": E}``         server, then it closes the connection
``{"op": "arena", "id": A, "size": N}``   either side, with the arena's descriptor
``{"op": "arena-ok", "id": A}``           server: it mapped the client's arena
``{"op": "release", "id": A}``            either side: the peer's arena A may be reused
``{"op": "forget", "id": A}``             either side: arena A will not be used again
========================================  =============================================

In a frame, the header field ``"shm"`` maps a buffer's index to ``[arena id, nbytes]``
and that buffer's length in the byte stream is 0. A frame without it is byte for byte
what it was before, so the TCP wire is unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import mmap
import os
import socket
import struct
import weakref
from collections.abc import Callable
from typing import Any

from statehost._errors import WireError

__all__ = ["HEADER", "SHM_HEADER", "Arena", "PeerArena", "arena_size", "available",
           "page_aligned", "receive", "send", "shareable", "shared"]

#: The frame header field naming buffers held in shared memory.
SHM_HEADER = "shm"
#: The HTTP header naming the client's shared-memory channel.
HEADER = "x-statehost-shm"
_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4)
_MAX_PACKET = 64 * 1024
_MAX_FDS = 16
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Arenas are sized in these steps, so buffers of nearly the same size share arenas.
_STEP = 1 << 20


# -- the channel's packets --------------------------------------------------------
def send(sock: socket.socket, message: dict[str, Any], fds: tuple[int, ...] = (),
         flags: int = 0) -> None:
    """Sends one message (one packet), with ``fds`` attached."""
    data = json.dumps(message, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds), flags)
    else:
        sock.send(data, flags)


def receive(sock: socket.socket, flags: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and its descriptors; ``(None, [])`` at end of connection.

    Raises:
        WireError: the packet is not a JSON object, or came with too many descriptors
            (every descriptor received is closed first).
    """
    data, fds, msg_flags, _ = socket.recv_fds(sock, _MAX_PACKET, _MAX_FDS, flags)
    if not data and not fds:
        return None, []
    try:
        if msg_flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise WireError(f"statehost shared memory: a packet came with more than "
                            f"{_MAX_FDS} descriptors or {_MAX_PACKET} bytes")
        message = json.loads(data)
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise WireError(f"statehost shared memory: the packet {data[:80]!r} is not a "
                            "channel message (a JSON object with an 'op')")
    except (WireError, ValueError) as exc:
        for fd in fds:
            os.close(fd)
        if isinstance(exc, WireError):
            raise
        raise WireError(f"statehost shared memory: the packet {data[:80]!r} is not "
                        f"JSON ({exc})") from exc
    return message, fds


# -- arenas -------------------------------------------------------------------------
def arena_size(nbytes: int) -> int:
    return max(1, -(-nbytes // _STEP)) * _STEP


class Arena:
    """Memory this side made and fills; the peer maps it once (``fd`` until sent)."""

    def __init__(self, arena_id: str, size: int):
        fd = os.memfd_create(f"statehost-{arena_id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self.id, self.size, self.fd = arena_id, size, fd
        self.busy = False  # filled and lent; the peer has not released it
        self.known = False  # the peer has the descriptor

    def fill(self, data: memoryview) -> None:
        self.map[: data.nbytes] = data.cast("B") if data.format != "B" or data.ndim != 1 \
            else data

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.size <= 2 * max(nbytes, _STEP)

    def drop_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.drop_fd()
        with contextlib.suppress(BufferError):  # a view still in use keeps the mapping
            self.map.close()


class PeerArena:
    """The peer's arena, mapped here once; each use of its bytes is a lease."""

    def __init__(self, arena_id: str, size: int, fd: int):
        try:
            info = os.fstat(fd)
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if info.st_size < size or not seals & fcntl.F_SEAL_SHRINK:
                raise WireError(
                    f"statehost shared memory: arena {arena_id!r} has {info.st_size} bytes "
                    f"(announced {size}) and seals {seals:#x}; an arena must be at least as "
                    "large as announced and sealed against shrinking (F_SEAL_SHRINK)")
            self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise WireError(f"statehost shared memory: arena {arena_id!r} cannot be mapped "
                            f"({exc})") from exc
        finally:
            os.close(fd)
        import numpy as np

        self.id, self.size = arena_id, size
        self._bytes = np.frombuffer(self.map, np.uint8)
        self.leased = False

    def lease(self, nbytes: int, on_release: Callable[[str], None],
              private: Callable[[int], memoryview] | None = None) -> memoryview:
        """A view of the first ``nbytes``; when every view of it is gone,
        ``on_release(id)`` runs (from whichever thread dropped the last one). With
        ``private`` (``nbytes`` -> a buffer of the receiver's own), a copy there instead,
        and the arena is released at once."""
        if nbytes > self.size:
            raise WireError(f"statehost shared memory: a buffer of {nbytes} bytes is named "
                            f"in arena {self.id!r} of {self.size}")
        if self.leased:
            raise WireError(f"statehost shared memory: arena {self.id!r} is named again "
                            "before it was released")
        if private is not None:
            mine = private(nbytes)
            mine[:] = memoryview(self._bytes[:nbytes])
            on_release(self.id)
            return mine
        self.leased = True
        piece = self._bytes[:nbytes]  # an ndarray of its own: the lease's identity
        weakref.finalize(piece, self._released, on_release)
        return memoryview(piece)

    def _released(self, on_release: Callable[[str], None]) -> None:
        self.leased = False
        on_release(self.id)

    def close(self) -> None:
        self._bytes = None  # type: ignore[assignment]
        with contextlib.suppress(BufferError):  # leases still in use keep the mapping
            self.map.close()


def page_aligned(nbytes: int) -> Any:
    """A fresh ``uint8`` array that starts on a page: ``jax.device_put`` on CPU takes such
    memory as it is (0.5 ms for 128 MiB), and copies memory aligned to less than 64 bytes,
    as ``np.empty``'s is, at about 1-2 GB/s (67-130 ms; jax 0.10, 2 cores)."""
    import numpy as np

    raw = np.empty(nbytes + mmap.PAGESIZE, np.uint8)
    start = -raw.ctypes.data % mmap.PAGESIZE
    return raw[start : start + nbytes]


# -- the frame extension ----------------------------------------------------------------
def shareable(encoded: Any, threshold: int) -> list[int]:
    """The indices of an encoded frame's buffers of at least ``threshold`` bytes."""
    pieces = encoded.pieces
    return [(i - 2) // 2 for i in range(2, len(pieces), 2)
            if memoryview(pieces[i]).nbytes >= max(threshold, 1)]


def shared(encoded: Any, refs: dict[int, tuple[str, int]]) -> Any:
    """The frame ``encoded`` with the buffers in ``refs`` (index -> ``(arena, nbytes)``)
    named in its header instead of carried."""
    from statehost.wire._frame import MAGIC, Encoded

    pieces = list(encoded.pieces)
    head = bytes(memoryview(pieces[0]))
    (head_len,) = _U32.unpack_from(head, 4)
    header = json.loads(head[8 : 8 + head_len])
    header[SHM_HEADER] = {str(i): [arena, n] for i, (arena, n) in refs.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    pieces[0] = MAGIC + _U32.pack(len(text)) + text + head[8 + head_len:]
    for index in refs:
        pieces[1 + 2 * index] = _U64.pack(0)
        pieces[2 + 2 * index] = b""
    return Encoded(pieces)


def available() -> str | None:
    """Why shared memory cannot be used in this process, or ``None`` when it can: memory
    files, their seals and passing a descriptor over a Unix socket are each tried once."""
    if not hasattr(os, "memfd_create") or not hasattr(socket, "send_fds"):
        return "this platform has no memfd_create or SCM_RIGHTS (Linux only)"
    try:
        arena = Arena("probe", 4096)
    except OSError as exc:
        return f"memfd_create or its seals failed ({exc})"
    try:
        left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with left, right:
            send(left, {"op": "arena", "id": "probe", "size": 4096}, (arena.fd,))
            _, fds = receive(right)
            if len(fds) != 1:
                return "a descriptor sent over a Unix socket did not arrive"
            PeerArena("probe", 4096, fds[0]).close()
    except (OSError, WireError) as exc:
        return f"passing a memory file over a Unix socket failed ({exc})"
    finally:
        arena.close()
    return None
