"""A user-space TCP proxy that delays every chunk by a fixed time each way, for the benchmarks.

This kernel has no ``netem`` qdisc, so a slower link is simulated here: each chunk read from
one side at time ``t`` is written to the other side at ``t + delay``. Reading never waits for
writing: per direction, a reader thread keeps reading and queues ``(due, chunk)``, and a
writer thread writes the queue in order as each chunk falls due. So a request that the client
sends in several chunks costs ``delay`` once, not once per chunk, and the link's bandwidth is
not divided by the delay (as on a real link with a large window). Bytes keep their order; an
end of stream (half-close) is delayed and forwarded like data. With ``delay == 0`` chunks are
written as soon as they are read: the extra hop alone, to compare the delayed link with.

A chunk leaves a little after its due time: ``time.sleep``'s wake-up latency, about
0.1-0.3 ms per direction on the 2-core VM this was written on (so a 1 ms link adds about
2.3-2.6 ms to a round trip, not exactly 2). ``bench_async.py`` prints what each link adds.

The TCP handshake itself is not delayed (the kernel answers it), so only traffic on an open
connection pays the delay; the client keeps its connections alive, so that is every call.

Run as a script, in its own process so that it does not share the measured client's GIL::

    python bench/_delay_proxy.py --target 127.0.0.1:8470 --delay-ms 1 [--port 0]

It prints ``listening on 127.0.0.1:PORT`` once it accepts connections. From Python,
``proxying(target_url, delay_ms)`` runs it until its ``with`` block ends and yields the URL
to connect to.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

__all__ = ["DelayProxy", "proxying"]

_READ = 1 << 18  # bytes asked of each recv; a large body still streams through in pieces


class _Connection:
    """One proxied connection: two sockets and the directions still copying between them."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self._lock = threading.Lock()
        self._open = 2

    def abort(self) -> None:
        """Ends both directions at once: a reset or error on one side ends the other too."""
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def finished(self) -> None:
        with self._lock:
            self._open -= 1
            last = self._open == 0
        if last:
            for sock in (self.client, self.upstream):
                sock.close()


def _copy_now(src: socket.socket, dst: socket.socket, conn: _Connection) -> None:
    """The zero-delay direction: each chunk is written as soon as it is read."""
    try:
        while chunk := src.recv(_READ):
            dst.sendall(chunk)
        dst.shutdown(socket.SHUT_WR)  # the end of stream, forwarded
    except OSError:
        conn.abort()
    finally:
        conn.finished()


def _copy_delayed(src: socket.socket, dst: socket.socket, delay: float,
                  conn: _Connection) -> None:
    """Reads ``src`` without pause; a second thread writes each chunk ``delay`` s after its read.

    Threads and ``time.sleep`` rather than asyncio: asyncio rounds every select timeout up
    to the next whole millisecond (epoll's unit, CPython 3.11), so a chunk due 50 us after
    the one before it would leave up to 1 ms late; ``time.sleep`` overshoots by ~0.1 ms.
    """
    pending: queue.SimpleQueue[tuple[float, bytes | None]] = queue.SimpleQueue()

    def write() -> None:
        try:
            while True:
                due, chunk = pending.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if chunk is None:  # a reset: the reader already aborted the connection
                    return
                if not chunk:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(chunk)  # blocks this writer only; the reader keeps reading
        except OSError:
            conn.abort()
        finally:
            conn.finished()

    threading.Thread(target=write, daemon=True).start()
    try:
        while chunk := src.recv(_READ):
            pending.put((time.monotonic() + delay, chunk))
        pending.put((time.monotonic() + delay, b""))  # an end of stream, delayed like data
    except OSError:
        pending.put((0.0, None))
        conn.abort()


class DelayProxy:
    """A TCP proxy on ``host:port`` in front of ``target``, adding ``delay`` s each way.

    Arguments:
        target: ``(host, port)`` of the server.
        delay: seconds added to each direction (0: none, the extra hop alone).
        host, port: where to listen (port 0: any free port; see ``address``).

    Example:
        >>> proxy = DelayProxy(("127.0.0.1", 8470), 0.001)  # doctest: +SKIP
        >>> threading.Thread(target=proxy.serve_forever, daemon=True).start()  # doctest: +SKIP
    """

    def __init__(self, target: tuple[str, int], delay: float, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.target, self.delay = target, delay
        self._listener = socket.create_server((host, port))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]

    def serve_forever(self) -> None:
        """Accepts connections until the listening socket is closed."""
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._start, args=(client,), daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _start(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Connection(client, upstream)
        for src, dst in ((client, upstream), (upstream, client)):
            if self.delay > 0:
                args: tuple = (src, dst, self.delay, conn)
                target = _copy_delayed
            else:
                args, target = (src, dst, conn), _copy_now
            threading.Thread(target=target, args=args, daemon=True).start()


def _parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--target wants HOST:PORT, got {text!r}")
    return host, int(port)


@contextlib.contextmanager
def proxying(target_url: str, delay_ms: float, timeout: float = 30.0) -> Iterator[str]:
    """Runs the proxy in a subprocess in front of ``target_url``; yields the URL to use instead.

    Arguments:
        target_url: the server's URL, ``http://HOST:PORT``.
        delay_ms: milliseconds added to each direction.
        timeout: seconds to wait for a proxy that failed to start to exit.

    Returns:
        A context manager yielding ``http://127.0.0.1:PORT``; the proxy stops when it exits.
    """
    parts = urlsplit(target_url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"proxying: target_url wants http://HOST:PORT, got {target_url!r}")
    # stderr goes to a file, not a pipe nobody reads once the proxy runs (a full pipe
    # would stall it); it is shown if the proxy fails to start.
    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(
            [sys.executable, __file__, "--target", f"{parts.hostname}:{parts.port}",
             "--delay-ms", repr(float(delay_ms))],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()  # the proxy's first line, or "" if it died
            if not line.startswith("listening on "):
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired as exc:
                    raise RuntimeError(f"the delay proxy printed {line!r}") from exc
                errors.seek(0)
                raise RuntimeError(
                    f"the delay proxy exited with {process.returncode}:\n{errors.read()}"
                )
            yield f"{parts.scheme or 'http'}://{line.split()[-1]}"
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=_parse_target, required=True, help="HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=1.0, help="delay each way (ms)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    args = parser.parse_args()
    proxy = DelayProxy(args.target, args.delay_ms / 1000, args.host, args.port)
    host, port = proxy.address
    print(f"listening on {host}:{port}", flush=True)
    proxy.serve_forever()  # until SIGTERM


if __name__ == "__main__":
    main()
