"""The server's side of shared-memory transfer: the channel socket, one connection per
client, and the hooks that put a request's and a reply's large buffers in shared memory.

How it works (the frame extension, arenas, leases and the channel's messages are
``statehost/wire/_shared_memory.py``):

- ``statehost serve`` with a Unix socket at ``S`` also listens on ``S.shm``, a
  ``SOCK_SEQPACKET`` socket in the same private directory, mode 0600. A client connects,
  sends the token it uses for HTTP and gets a channel id, which its HTTP requests name
  (header ``x-statehost-shm``); a request naming a channel opened with another token is
  refused (403), so the id alone is not a credential. Before the token is accepted, any
  descriptor sent is closed unmapped, and a wrong token closes the connection.
- Upload: the client fills an arena of its own; the first time, it sends the arena's
  descriptor, which the connection's thread maps (``arena-ok``). The frame names the
  arena; :func:`attacher` leases the bytes to the request, and the lease's end (the last
  view of it dropped: the values were copied to the devices) sends ``release``.
- Pull: :func:`reply` fills an arena of the server's for each large buffer of the
  answer (sending its descriptor on first use, before the answer's first byte), and the
  frame names it; the client's ``release`` frees the arena for the next answer.
- When a client's connection closes, killed or not, every arena it sent is unmapped and
  every arena made for it closed: nothing of it stays in the server.

Shared memory is off (``/v1/info``'s ``shared_memory`` and a log line at start say why)
when ``STATEHOST_SHARED_MEMORY=0``, when there is no Unix socket, or when this host
cannot make memory files or pass descriptors (checked once at start).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import secrets
import socket
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from statehost._errors import WireError
from statehost.wire._shared_memory import (
    HEADER,
    Arena,
    PeerArena,
    arena_size,
    available,
    page_aligned,
    receive,
    send,
    shareable,
    shared,
)

__all__ = ["REPLY", "Connection", "SharedMemory", "attacher", "reply"]

log = logging.getLogger("statehost.server")

#: The shared-memory connection of the request being served (set by :func:`attacher`),
#: which :func:`reply` fills the answer's large buffers into.
REPLY: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
    "statehost_shm_reply", default=None)

_AUTH_TIMEOUT = 5.0
_MAX_FREE = 4  # released arenas a connection keeps for reuse, per side
# Arenas per connection and side: each mapping holds a descriptor (mmap keeps its own
# copy), and a client keeping the values of many pulls keeps their arenas lent. Past
# this, answers go through the byte stream and new arenas of the client's are refused.
_MAX_ARENAS = 64

_MSG_NO_CHANNEL = (
    "{where}: the shared-memory channel {channel!r} named in the {header} header is not open "
    "on this server (it closed, or the server restarted). Fix: reconnect with "
    "statehost.connect(...), which opens a new one."
)
_MSG_OTHER_TOKEN = (
    "{where}: the shared-memory channel named in the {header} header was opened with "
    "another token than this request's. Fix: send the channel's requests with the token "
    "that opened it (statehost.connect does)."
)
_MSG_REFUSED = (
    "statehost shared memory: {what}. Send {{\"op\": \"auth\", \"token\": <the bearer token "
    "you use for HTTP>}} first, without descriptors (statehost.connect does)."
)


class SharedMemory:
    """Whether shared memory is in use and why, and the channel socket when it is."""

    def __init__(self, enabled: bool, why: str, threshold: int, path: Path | None = None,
                 resolve: Callable[[str], Any] | None = None, metrics: Any = None):
        self.enabled, self.why, self.threshold, self.path = enabled, why, threshold, path
        self._resolve, self._metrics = resolve, metrics
        self._connections: dict[str, Connection] = {}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._buffers = HostBuffers()

    @classmethod
    def start(cls, settings: Any, unix_socket: Path | None, app: Any) -> SharedMemory:
        """Checks whether shared memory can be used, and listens next to ``unix_socket``
        when it can; logs which path array bytes take, and why."""
        threshold = settings.shared_memory_threshold
        why = None
        if not settings.shared_memory:
            why = "turned off (STATEHOST_SHARED_MEMORY=0)"
        elif unix_socket is None:
            why = "no Unix socket (--unix off, or none could be made)"
        else:
            why = available()
        if why is not None:
            log.info("shared memory: off, %s; array bytes go through the byte stream", why)
            return cls(False, why, threshold)
        from statehost.server.auth import resolve

        rt = app.state.runtime
        path = unix_socket.with_name(unix_socket.name + ".shm")
        service = cls(True, "on", threshold, path,
                      lambda token: resolve(token, settings.tokens, rt.tokens), rt.metrics)
        try:
            service._listen(path)
        except OSError as exc:
            why = f"the channel socket {path} cannot be made ({exc})"
            log.warning("shared memory: off, %s; array bytes go through the byte stream", why)
            return cls(False, why, threshold)
        log.info("shared memory: on, for buffers of %d bytes or more over the Unix socket "
                 "(channel %s)", threshold, path)
        return service

    def describe(self) -> dict[str, Any]:
        """``/v1/info``'s ``shared_memory``."""
        return {"enabled": self.enabled, "why": self.why, "threshold": self.threshold,
                "socket": None if self.path is None else str(self.path)}

    # -- the channel socket -------------------------------------------------------------
    def _listen(self, path: Path) -> None:
        if path.exists() or path.is_symlink():
            path.unlink()  # left by a server that was killed (the HTTP socket was checked)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # created 0600, as the HTTP socket
        try:
            sock.bind(str(path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, name="statehost-shm-accept", daemon=True).start()

    def _accept(self) -> None:
        listener = self._listener
        while listener is not None:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(sock,), name="statehost-shm",
                             daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        """One client's connection: its token first, then arenas and releases until it
        closes; then everything of it is closed."""
        try:
            sock.settimeout(_AUTH_TIMEOUT)
            principal = self._authenticate(sock)
        except (OSError, WireError):
            principal = None
        if principal is None:
            sock.close()
            return
        sock.settimeout(None)
        conn = Connection(secrets.token_hex(16), principal, sock, self.threshold,
                          self._metrics, self._buffers)
        with self._lock:
            self._connections[conn.id] = conn
        try:
            send(sock, {"op": "ok", "channel": conn.id, "threshold": self.threshold})
            conn.run()
        except (OSError, WireError) as exc:
            log.debug("shared memory: channel %s ended (%s)", conn.id[:8], exc)
        finally:
            with self._lock:
                self._connections.pop(conn.id, None)
            conn.close()

    def _authenticate(self, sock: socket.socket) -> Any:
        message, fds = receive(sock)
        for fd in fds:  # nothing is mapped before the token is accepted
            os.close(fd)
        if message is None:
            return None
        token = message.get("token")
        if message.get("op") != "auth" or fds or not isinstance(token, str) or not token:
            what = "descriptors came before the token" if fds else "no token"
        else:
            principal = self._resolve(token) if self._resolve is not None else None
            if principal is not None:
                return principal
            what = "the token is not accepted by this server"
        with contextlib.suppress(OSError):
            send(sock, {"op": "refused", "error": _MSG_REFUSED.format(what=what)})
        return None

    def connection(self, channel: str) -> Connection | None:
        with self._lock:
            return self._connections.get(channel)

    def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            if self.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
        with self._lock:
            connections = list(self._connections.values())
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)


class Connection:
    """One client's channel: the arenas it sent (mapped here) and the ones made for it."""

    def __init__(self, channel: str, principal: Any, sock: socket.socket, threshold: int,
                 metrics: Any, buffers: HostBuffers | None = None):
        self.id, self.principal, self.sock, self.threshold = channel, principal, sock, threshold
        # Uploads are copied out of the client's arena into these on CPU devices (see
        # _aliasing_devices); None: the request gets a view of the arena itself.
        self._private = buffers.take if buffers is not None and _aliasing_devices() else None
        self._metrics = metrics
        self._peer: dict[str, PeerArena] = {}
        self._mine: dict[str, Arena] = {}
        self._lock = threading.RLock()  # a lease's end may run in any thread, mid-operation
        self._next = 0
        self.closed = False

    def run(self) -> None:
        """Reads the client's messages until it closes the connection."""
        while True:
            message, fds = receive(self.sock)
            if message is None:
                return
            op, arena = message["op"], message.get("id")
            if op == "arena" and len(fds) == 1 and isinstance(arena, str) \
                    and isinstance(message.get("size"), int):
                try:
                    if len(self._peer) >= _MAX_ARENAS:
                        os.close(fds[0])
                        raise WireError(f"statehost shared memory: this channel already maps "
                                        f"{_MAX_ARENAS} arenas; send the bytes in the stream")
                    mapped = PeerArena(arena, message["size"], fds[0])
                except WireError as exc:
                    send(self.sock, {"op": "arena-refused", "id": arena, "error": str(exc)})
                    continue
                with self._lock:
                    old = self._peer.pop(arena, None)
                    self._peer[arena] = mapped
                if old is not None:
                    old.close()
                send(self.sock, {"op": "arena-ok", "id": arena})
                continue
            for fd in fds:
                os.close(fd)
            if op == "release":
                self._released(arena)
            elif op == "forget":
                with self._lock:
                    gone = self._peer.pop(arena, None)
                if gone is not None:
                    gone.close()

    # -- uploads --------------------------------------------------------------------------
    def attach(self, arena: str, nbytes: int) -> memoryview:
        """The bytes of a request's buffer in the client's ``arena`` (``decode``'s attach)."""
        with self._lock:
            mapped = self._peer.get(arena)
        if mapped is None:
            raise WireError(f"statehost shared memory: the frame names arena {arena!r}, which "
                            "this channel never received")
        view = mapped.lease(nbytes, self._release_peer, self._private)
        if self._metrics is not None:
            self._metrics.shared_memory_bytes.labels("in").inc(nbytes)
        return view

    def _release_peer(self, arena: str) -> None:
        if self.closed:
            return
        with self._lock, contextlib.suppress(OSError):
            # Never blocks: a client that reads nothing loses its releases, not the server
            # its thread (it then makes new arenas instead of reusing these).
            send(self.sock, {"op": "release", "id": arena}, flags=socket.MSG_DONTWAIT)

    # -- replies --------------------------------------------------------------------------
    def take(self, nbytes: int) -> Arena | None:
        """A released arena of this connection that fits ``nbytes``, or a new one, marked
        busy; ``None`` when none can be had (too many, or memory files fail: the stream)."""
        with self._lock:
            fits = [a for a in self._mine.values() if not a.busy and a.fits(nbytes)]
            if fits:
                arena = min(fits, key=lambda a: a.size)
            elif len(self._mine) >= _MAX_ARENAS:
                return None
            else:
                self._next += 1
                try:
                    arena = Arena(f"s{self._next}", arena_size(nbytes))
                except OSError as exc:  # out of descriptors or memory: this answer streams
                    log.warning("shared memory: no arena of %d bytes (%s); the answer goes "
                                "through the byte stream", nbytes, exc)
                    return None
                self._mine[arena.id] = arena
            arena.busy = True
            return arena

    def lend(self, arena: Arena, data: memoryview) -> None:
        """Fills ``arena`` and, on its first use, sends its descriptor to the client."""
        arena.fill(data)
        if not arena.known:
            with self._lock:
                send(self.sock, {"op": "arena", "id": arena.id, "size": arena.size},
                     (arena.fd,))
            arena.known = True
            arena.drop_fd()
        if self._metrics is not None:
            self._metrics.shared_memory_bytes.labels("out").inc(data.nbytes)

    def _released(self, arena_id: Any) -> None:
        with self._lock:
            arena = self._mine.get(arena_id) if isinstance(arena_id, str) else None
            if arena is None:
                return
            arena.busy = False
            free = [a for a in self._mine.values() if not a.busy]
            extra = free[:-_MAX_FREE] if len(free) > _MAX_FREE else []
            for gone in extra:
                del self._mine[gone.id]
        for gone in extra:
            gone.close()
            with contextlib.suppress(OSError):
                send(self.sock, {"op": "forget", "id": gone.id}, flags=socket.MSG_DONTWAIT)

    def close(self) -> None:
        self.closed = True
        with self._lock:
            peer, self._peer = list(self._peer.values()), {}
            mine, self._mine = list(self._mine.values()), {}
        for mapped in peer:
            mapped.close()
        for arena in mine:
            arena.close()
        self.sock.close()


class HostBuffers:
    """Page-aligned host buffers that uploads are copied into on CPU devices, reused.

    Each buffer is lent as a lease (a view of its own, as arenas are: see ``PeerArena``):
    it comes back here when its last view is gone, which on CPU devices is when the state
    value that ``jax.device_put`` made of it (without a copy) is replaced. Fresh memory
    costs a page fault and a zeroed page per page: a copy of 128 MiB into a fresh buffer
    took 30-2,000 ms on a loaded 2-core machine, and 10-20 ms into one used before.
    """

    def __init__(self, max_free: int = 4, max_free_bytes: int = 1 << 30):
        self._free: list[Any] = []
        self._lock = threading.Lock()
        self._max_free, self._max_free_bytes = max_free, max_free_bytes

    def take(self, nbytes: int) -> memoryview:
        size = arena_size(nbytes)
        with self._lock:
            fits = [b for b in self._free if size <= b.nbytes <= 2 * size]
            if fits:
                buffer = min(fits, key=lambda b: b.nbytes)
                self._free.remove(buffer)
            else:
                buffer = None
        if buffer is None:
            buffer = page_aligned(size)
        piece = buffer[:nbytes]  # an ndarray of its own: the lease's identity
        weakref.finalize(piece, self._give_back, buffer)
        return memoryview(piece)

    def _give_back(self, buffer: Any) -> None:
        with self._lock:
            self._free.append(buffer)
            while len(self._free) > self._max_free or \
                    sum(b.nbytes for b in self._free) > self._max_free_bytes:
                self._free.pop(0)


def _aliasing_devices() -> bool:
    """Whether uploads are copied out of the client's arena: on CPU devices,
    ``jax.device_put`` of page-aligned host memory aliases it (checked on jax 0.10), so a
    resident state would live in pages the client can still write; an accelerator copies
    the view to its own memory, and the view is handed over as it is."""
    import jax

    return any(d.platform == "cpu" for d in jax.local_devices())


# -- the hooks of frame routes -------------------------------------------------------------
def attacher(request: Any, where: str) -> Callable[[str, int], memoryview] | None:
    """For ``read_frame``: the ``attach`` of the request's shared-memory channel (header
    ``x-statehost-shm``), which also receives the reply's large buffers; ``None`` when the
    request names none.

    Raises:
        ProtocolError: the channel is not open here.
        ForbiddenError: it was opened with another token.
    """
    channel = request.headers.get(HEADER)
    if not channel:
        return None
    from statehost.server.errors import ForbiddenError, ProtocolError

    service = getattr(request.app.state, "shared_memory", None)
    conn = service.connection(channel) if service is not None else None
    if conn is None:
        raise ProtocolError(_MSG_NO_CHANNEL.format(where=where, channel=channel[:8] + "...",
                                                   header=HEADER))
    if conn.principal != getattr(request.state, "principal", None):
        raise ForbiddenError(_MSG_OTHER_TOKEN.format(where=where, header=HEADER))
    REPLY.set(conn)
    return conn.attach


def stream_nbytes(part: Any) -> int:
    """The bytes of an answer's section (or whole encoded frame) that go through the byte
    stream: all of them unless the request has a shared-memory channel, which takes the
    large buffers (``statehost_wire_bytes_total`` counts the rest)."""
    if part is None:
        return 0
    conn = REPLY.get()
    if conn is None:
        return part.nbytes
    buffers = part.pieces[2::2] if hasattr(part, "pieces") else part.buffers
    return part.nbytes - sum(n for n in (memoryview(b).nbytes for b in buffers)
                             if n >= conn.threshold)


def reply(encoded: Any) -> tuple[Any, Callable[[], None]] | None:
    """The answer ``encoded`` with its large buffers named in arenas, and the function that
    fills them (to run off the event loop, before the answer's first byte goes out); ``None``
    when the request has no channel or the answer no large buffer."""
    conn = REPLY.get()
    if conn is None or conn.closed:
        return None
    indices = shareable(encoded, conn.threshold)
    if not indices:
        return None
    data = {i: memoryview(encoded.pieces[2 + 2 * i]).cast("B") for i in indices}
    lent = {}
    for i, view in data.items():
        arena = conn.take(view.nbytes)
        if arena is not None:  # else this buffer stays in the byte stream
            lent[i] = arena
    if not lent:
        return None

    def fill() -> None:
        for i, arena in lent.items():
            conn.lend(arena, data[i])

    return shared(encoded, {i: (arena.id, data[i].nbytes) for i, arena in lent.items()}), fill
