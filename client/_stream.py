"""The client's end of the call stream: one WebSocket, frames out in order, replies matched.

:class:`Stream` sends each request frame as one binary message and returns a
:class:`Pending` at once; a reader thread matches each reply (by ``call_id``)
to its ``Pending``. At most ``max_in_flight`` requests wait for replies: the
next ``send`` blocks until one comes back (backpressure). What the replies
mean is ``client/_dispatch.py``'s business; this module only moves frames.

**A dropped connection** (the server restarted its socket, a proxy timed out) is
opened again once, and every request still waiting for its reply is sent again
with its call id. The server answers a call it already ran with that first
outcome (``Session.outcomes``), so nothing is applied twice and nothing is lost.
If the connection cannot be opened again, each waiting request fails with a
``TransportError`` that says its outcome is unknown.

A connection is anything with ``send(bytes)``, ``recv() -> bytes | None`` (None:
closed, with ``close_code`` / ``close_reason``) and ``close()``: the
:class:`WebSocketConnection` here, or ``statehost.server.testing.InProcessTransport``'s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from statehost._errors import WireError
from statehost.client._errors import TransportError
from statehost.wire import Frame, decode_all

__all__ = ["Pending", "Stream", "WebSocketConnection"]

# A wait in the user's thread wakes this often, so Ctrl-C is seen at once.
_TICK = 0.1
# Requests held back to leave together (see Stream.send): only while more than this many
# are unanswered, at most this many frames or bytes at once.
_HOLD_IN_FLIGHT = 8
_HOLD_FRAMES = 16
_HOLD_BYTES = 64 << 10


class WebSocketConnection:
    """A ``websockets`` synchronous client connection with the contract above."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float,
                 unix: str | None = None):
        from websockets.sync.client import connect, unix_connect

        self.close_code: int | None = None
        self.close_reason = ""
        # No size limit here (the server enforces its own), no compression (frames hold
        # arrays), and no keepalive pings that a long call's silence could fail.
        # Entered as a context manager (websockets 17 warns otherwise); close() exits it.
        options = dict(additional_headers=headers, max_size=None, compression=None,
                       open_timeout=min(timeout, 10.0), ping_interval=None)
        self._ws = (unix_connect(unix, url, **options) if unix is not None
                    else connect(url, **options)).__enter__()

    def send(self, data: bytes) -> None:
        self._ws.send(data)

    def recv(self) -> bytes | None:
        from websockets.exceptions import ConnectionClosed

        try:
            message = self._ws.recv()
        except ConnectionClosed as exc:
            received = exc.rcvd
            self.close_code = received.code if received is not None else 1006
            self.close_reason = received.reason if received is not None else "connection lost"
            return None
        return message if isinstance(message, bytes) else message.encode()

    def close(self) -> None:
        self._ws.close()


class Pending:
    """A request sent on the stream, until its reply (a frame) or its failure arrives."""

    __slots__ = ("call_id", "data", "event", "frame", "error")

    def __init__(self, call_id: str, data: bytes):
        self.call_id = call_id
        self.data: bytes | None = data  # kept to send again after a reconnect
        self.event = threading.Event()
        self.frame: Frame | None = None
        self.error: Exception | None = None

    @property
    def done(self) -> bool:
        return self.event.is_set()

    def wait(self) -> None:
        """Waits in short slices, so a KeyboardInterrupt is raised at once."""
        while not self.event.wait(_TICK):
            pass

    def _finish(self, frame: Frame | None, error: Exception | None) -> None:
        self.frame, self.error, self.data = frame, error, None
        self.event.set()


class Stream:
    """Sends frames in order on one connection; see the module docstring."""

    def __init__(self, connect: Callable[[], Any], max_in_flight: int, where: str):
        self._connect = connect
        self._max = max_in_flight
        self._where = where
        self._conn = connect()
        self._pending: dict[str, Pending] = {}
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._send_lock = threading.Lock()
        self._held: list[bytes] = []  # requests not sent yet (see send), under _room
        self._held_bytes = 0
        self._failure: str | None = None  # why the stream is unusable, once it is
        self._closing = False
        self.generation = 0  # how many times the connection was opened again
        self._reader = threading.Thread(target=self._read, name="statehost-stream", daemon=True)
        self._reader.start()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def broken(self) -> bool:
        """The connection was lost for good: a new ``Stream`` must be opened."""
        return self._failure is not None

    def send(self, call_id: str, data: bytes) -> Pending:
        """Sends a request that has a reply; blocks while ``max_in_flight`` wait for theirs.

        With more than ``_HOLD_IN_FLIGHT`` requests unanswered (the server has work queued),
        a small request waits for the next reply, or for ``_HOLD_FRAMES`` others, and leaves
        with them in one message: fewer messages for both sides to handle per call.
        """
        with self._room:
            while len(self._pending) >= self._max and self._failure is None:
                self._room.wait(_TICK)
            self._check()
            pending = self._pending[call_id] = Pending(call_id, data)
            self._held.append(data)
            self._held_bytes += len(data)
            hold = len(self._pending) > _HOLD_IN_FLIGHT and len(self._held) < _HOLD_FRAMES \
                and self._held_bytes < _HOLD_BYTES
        if not hold:
            self._flush()
        return pending

    def post(self, data: bytes) -> None:
        """Sends a request that has no reply (``free``, ``control``), after those held."""
        self._check()
        with self._room:
            self._held.append(data)
            self._held_bytes += len(data)
        self._flush()

    def flush(self) -> None:
        """Sends the requests held back now (the user is about to wait for one)."""
        if self._held:
            self._flush()

    def _flush(self) -> None:
        """Sends the held requests, in order, as one message (frames end to end)."""
        try:
            with self._send_lock:  # taken first: messages leave in the order they were made
                with self._room:
                    held, self._held, self._held_bytes = self._held, [], 0
                if held:
                    self._conn.send(held[0] if len(held) == 1 else b"".join(held))
        except Exception:  # noqa: S110  the reader sees the close and reconnects or fails all
            pass

    def _write(self, data: bytes) -> None:
        try:
            with self._send_lock:
                self._conn.send(data)
        except Exception:  # noqa: S110  the reader sees the close and reconnects or fails all
            pass

    def _check(self) -> None:
        if self._failure is not None:
            raise TransportError(self._failure)

    def close(self) -> None:
        self._closing = True
        try:
            self._conn.close()
        except Exception:  # noqa: S110  closing a dead socket
            pass
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=5)
        # A request sent after this, or one still waiting, gets an error, never a hang.
        self._fail_all(f"{self._where}: the client closed this stream (client.close(), or "
                       "the client was garbage-collected); open a new client to go on")

    # -- the reader thread ---------------------------------------------------------------
    def _read(self) -> None:
        try:
            self._read_replies()
        except BaseException as exc:  # never leave a waiter hanging
            self._fail_all(f"{self._where}: reading the server's replies failed "
                           f"({type(exc).__name__}: {exc}); the outcome of the requests in "
                           "flight is unknown.")
            raise
        finally:
            self._closing = True
            try:
                self._conn.close()  # release the socket of a closed connection
            except Exception:  # noqa: S110
                pass

    def _read_replies(self) -> None:
        while True:
            data = self._conn.recv()
            if data is None:
                if self._closing or not self._reconnect():
                    return
                continue
            try:
                frames = decode_all(data)  # the server joins replies that are ready together
            except WireError as exc:
                self._fail_all(f"{self._where}: the server sent a message that is not a frame "
                               f"({exc}); the outcome of the requests in flight is unknown.")
                return
            for frame in frames:
                if not self._take(frame):
                    return
            if self._held:  # a reply came: what was held back leaves now
                self._flush()

    def _take(self, frame: Frame) -> bool:
        """Hands a reply to its ``Pending``; False when it ends the stream."""
        call_id = frame.header.get("call_id")
        with self._room:
            pending = self._pending.pop(call_id, None) if isinstance(call_id, str) else None
            self._room.notify_all()
        if pending is not None:
            pending._finish(frame, None)
        elif frame.header.get("kind") == "error":  # a failure of no request: fatal
            error = frame.header.get("error") or {}
            self._fail_all(f"{self._where}: the server refused the stream: "
                           f"{error.get('message', error)}")
            return False
        return True

    def _reconnect(self) -> bool:
        """Opens the connection again and re-sends what waits for replies; False if not."""
        code, reason = self._conn.close_code, self._conn.close_reason
        if code in (1003, 1007, 1008, 1009):  # refused by the server, not lost: no retry
            self._fail_all(f"{self._where}: the server closed the stream (code {code}: "
                           f"{reason}); the outcome of the requests in flight is unknown: "
                           "client.sync() raises for each.")
            return False
        for delay in (0.05, 0.25, 1.0):
            time.sleep(delay)
            try:
                conn = self._connect()
            except Exception:  # noqa: S112  the server may be coming back
                continue
            with self._room:
                waiting = [p for p in self._pending.values() if p.data is not None]
                self._conn = conn
                self.generation += 1
                self._held, self._held_bytes = [], 0  # sent again below, with the others
            for pending in waiting:  # in issue order: dicts keep insertion order
                self._write(pending.data)
            return True
        self._fail_all(f"{self._where}: the connection to the server was lost (code {code}: "
                       f"{reason}) and could not be opened again. The requests in flight may "
                       "or may not have been applied: their outcome is unknown.")
        return False

    def _fail_all(self, why: str) -> None:
        with self._room:
            self._failure = why
            waiting, self._pending = list(self._pending.values()), {}
            self._room.notify_all()
        for pending in waiting:
            pending._finish(None, TransportError(
                f"{why} (request {pending.call_id})"))
