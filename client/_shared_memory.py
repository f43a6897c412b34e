"""The client's side of shared-memory transfer (over the Unix socket, same host).

The client opens the server's channel socket (``/v1/info``'s ``shared_memory.socket``),
sends its token and gets a channel id that its frame requests name (header
``x-statehost-shm``). A request's buffers of at least the server's threshold are
copied into arenas of the client's (memory files, reused once the server has released
them) instead of the byte stream; an answer's large buffers arrive in the server's
arenas, which the client maps once and leases to the values it unpickles: when the last
of them is dropped, the arena goes back to the server (``release``, sent with the next
request). The mechanics shared with the server, and the lifetime rules, are
``statehost/wire/_shared_memory.py``; the server's side is ``server/shared_memory.py``.

The channel is used by one thread at a time (a lock); a lease that ends in another
thread only queues its release.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import select
import socket
import threading
from typing import Any

from statehost._errors import WireError
from statehost.client._errors import TransportError
from statehost.wire._shared_memory import (
    HEADER,
    Arena,
    PeerArena,
    arena_size,
    receive,
    send,
    shareable,
    shared,
)

__all__ = ["SharedMemoryChannel"]

log = logging.getLogger("statehost.client")

_MAX_FREE = 4  # released arenas kept for reuse
# Arenas lent and not released (a request the server refused before reading its frame
# never releases its arenas): past this many, the oldest are forgotten. Forgetting is
# always safe: the server's mapping keeps the bytes of a lease still in use.
_MAX_BUSY = 8
# How long a request waits for a busy arena of the right size to come back before making
# a new one: the server releases an upload's arena before it answers, so this is a
# bound for the unusual case (a job still holding its inputs), not a pause.
_REUSE_WAIT = 0.25

_MSG_REFUSED = (
    "statehost.connect: the server's shared-memory channel {path} refused this client: "
    "{error}"
)


class SharedMemoryChannel:
    """This client's channel to the server's shared memory."""

    def __init__(self, path: str, token: str | None, timeout: float):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            send(sock, {"op": "auth", "token": token or ""})
            answer, fds = receive(sock)
            for fd in fds:
                os.close(fd)
        except BaseException:
            sock.close()
            raise
        if answer is None or answer.get("op") != "ok":
            sock.close()
            error = "it closed the connection" if answer is None else answer.get("error")
            raise TransportError(_MSG_REFUSED.format(path=path, error=error))
        self.path, self.sock, self.timeout = path, sock, timeout
        self.id: str = str(answer["channel"])
        self.threshold = int(answer["threshold"])
        self.headers = {HEADER: self.id}
        self._mine: dict[str, Arena] = {}
        self._peer: dict[str, PeerArena] = {}
        self._releases: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()
        self._next = 0

    def alive(self) -> bool:
        """False once the server closed the channel (it stopped, or restarted: the new one
        does not know this channel's id)."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            if not readable:
                return True
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except (OSError, ValueError):
            return False

    # -- requests ---------------------------------------------------------------------------
    def share(self, encoded: Any) -> Any:
        """``encoded`` with its large buffers copied into arenas and named instead of
        carried (``encoded`` itself when it has none); sends queued releases first."""
        indices = shareable(encoded, self.threshold)
        with self._lock:
            self._flush()
            if not indices:
                return encoded
            refs = {}
            for index in indices:
                data = memoryview(encoded.pieces[2 + 2 * index]).cast("B")
                try:
                    arena = self._take(data.nbytes)
                except OSError as exc:  # out of descriptors or memory: the byte stream
                    log.info("statehost client: no arena of %d bytes (%s); the buffer goes "
                             "through the byte stream", data.nbytes, exc)
                    continue
                arena.fill(data)
                if not arena.known and not self._register(arena):
                    continue  # refused (the server maps too many): the byte stream
                refs[index] = (arena.id, data.nbytes)
            return shared(encoded, refs) if refs else encoded

    def flush(self) -> None:
        """Sends the releases of leases that ended since the last request."""
        if self._releases:
            with self._lock:
                self._flush()

    def _flush(self) -> None:
        while self._releases:
            send(self.sock, {"op": "release", "id": self._releases.popleft()})

    def _take(self, nbytes: int) -> Arena:
        self._drain(0.0)
        fits = self._fitting(nbytes)
        if not fits and any(a.busy and a.fits(nbytes) for a in self._mine.values()):
            self._drain(_REUSE_WAIT, until=lambda: bool(self._fitting(nbytes)))
            fits = self._fitting(nbytes)
        if fits:
            arena = min(fits, key=lambda a: a.size)
        else:
            busy = [a for a in self._mine.values() if a.busy]
            for gone in busy[:len(busy) - _MAX_BUSY + 1] if len(busy) >= _MAX_BUSY else []:
                self._forget(gone)
            self._next += 1
            arena = Arena(f"c{self._next}", arena_size(nbytes))
            self._mine[arena.id] = arena
        arena.busy = True
        return arena

    def _forget(self, arena: Arena) -> None:
        del self._mine[arena.id]
        arena.close()
        if arena.known:
            send(self.sock, {"op": "forget", "id": arena.id})

    def _fitting(self, nbytes: int) -> list[Arena]:
        return [a for a in self._mine.values() if not a.busy and a.fits(nbytes)]

    def _register(self, arena: Arena) -> bool:
        """Sends a new arena's descriptor and waits until the server has mapped it; False
        (and the arena dropped) when the server refuses it."""
        send(self.sock, {"op": "arena", "id": arena.id, "size": arena.size}, (arena.fd,))
        refused = self._drain(self.timeout, until=lambda: arena.known, wanted=arena.id)
        arena.drop_fd()
        if refused is None and arena.known:
            return True
        log.info("statehost client: the server refused arena %s (%s); the buffer goes "
                 "through the byte stream", arena.id, refused or "no answer")
        del self._mine[arena.id]
        arena.close()
        return False

    # -- answers -----------------------------------------------------------------------------
    def attach(self, arena_id: str, nbytes: int) -> memoryview:
        """The bytes of an answer's buffer in the server's arena (``decode``'s attach)."""
        with self._lock:
            if arena_id not in self._peer:
                self._drain(self.timeout, until=lambda: arena_id in self._peer)
            mapped = self._peer.get(arena_id)
            if mapped is None:
                raise WireError(f"statehost shared memory: the answer names arena "
                                f"{arena_id!r}, which the server never sent")
            return mapped.lease(nbytes, self._releases.append)

    # -- the channel's messages ---------------------------------------------------------------
    def _drain(self, wait: float, until: Any = None, wanted: str | None = None) -> str | None:
        """Handles the server's messages: those already there, then more for up to ``wait``
        seconds until ``until()``; returns the error of a refused ``wanted`` arena."""
        self.sock.settimeout(wait if wait > 0 else 0.0)
        try:
            while until is None or not until():
                try:
                    message, fds = receive(self.sock)
                except (BlockingIOError, TimeoutError):
                    return None
                if message is None:
                    raise TransportError("statehost shared memory: the server closed the "
                                         "channel")
                refused = self._handle(message, fds)
                if refused is not None and refused[0] == wanted:
                    return refused[1]
            return None
        finally:
            self.sock.settimeout(self.timeout)

    def _handle(self, message: dict[str, Any], fds: list[int]) -> tuple[str, str] | None:
        op, arena_id = message["op"], message.get("id")
        if op == "arena" and len(fds) == 1 and isinstance(arena_id, str):
            old = self._peer.pop(arena_id, None)
            if old is not None:
                old.close()
            self._peer[arena_id] = PeerArena(arena_id, int(message["size"]), fds[0])
            return None
        for fd in fds:
            os.close(fd)
        if op == "arena-ok" and arena_id in self._mine:
            self._mine[arena_id].known = True
        elif op == "arena-refused":
            return str(arena_id), str(message.get("error"))
        elif op == "release" and arena_id in self._mine:
            self._mine[arena_id].busy = False
            free = [a for a in self._mine.values() if not a.busy]
            for gone in free[:-_MAX_FREE] if len(free) > _MAX_FREE else []:
                self._forget(gone)
        elif op == "forget":
            gone = self._peer.pop(arena_id, None)
            if gone is not None:
                gone.close()
        return None

    def close(self) -> None:
        with self._lock:
            for arena in self._mine.values():
                arena.close()
            for mapped in self._peer.values():
                mapped.close()
            self._mine, self._peer = {}, {}
            with contextlib.suppress(OSError):
                self.sock.close()
