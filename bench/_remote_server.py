"""Servers for ``bench_remote.py``: ``statehost serve`` and the bare FastAPI floor, as subprocesses.

``serving(cmd, ...)`` runs a server on a free loopback port until its ``with`` block ends
(SIGTERM, then kill). Run as a script, this file *is* the bare app: the least a FastAPI
server under uvicorn can do for each of the benchmark's requests, started with the same
``uvicorn.run`` options as ``statehost serve`` (``server/cli.py``), so uvicorn picks the
same HTTP parser (httptools when installed) and event loop (uvloop when installed)::

    python bench/_remote_server.py --port 8471 [--log-level info]

``GET /v1/health``  200, as statehost's (the same start-up poll works for both);
``POST /echo``      the request body back (the 100-byte round trip);
``POST /upload``    reads the body into one buffer of its Content-Length (as statehost's
                    ``read_frame`` does, but into ``fresh_buffer``), and answers its size;
``GET /download``   ``?nbytes=N`` bytes, streamed in 4 MiB chunks with a Content-Length,
                    as statehost's ``frame_response`` sends a large frame.
"""

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["Command", "Served", "bare_command", "fresh_buffer", "serving", "statehost_command",
           "stop"]

_STREAM_CHUNK = 4 << 20  # what statehost's frame_response streams a large frame in


@dataclass
class Served:
    url: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def fresh_buffer(nbytes: int) -> memoryview:
    """A writable buffer of ``nbytes``, the fastest way to get one for a large body.

    ``np.empty`` rather than ``bytearray(n)``: no zero-fill pass, and numpy asks Linux for
    transparent huge pages on large allocations (``madvise``), so first-touch page faults
    up to 512 times fewer. On the 2-core VM this bench was written on, filling a fresh
    128 MiB ``bytearray`` took 64 ms against 11 ms for ``np.empty``.
    """
    import numpy as np

    return memoryview(np.empty(nbytes, np.uint8))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def statehost_command(port: int, data_dir: Path, log_level: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "statehost.server",
        "serve",
        "--port",
        str(port),
        "--cpu-devices",
        "8",
        "--data-dir",
        str(data_dir),
        "--log-level",
        log_level,
        # TCP only: a client given a loopback URL would otherwise move to the Unix socket
        # (where $XDG_RUNTIME_DIR exists), around the delay proxies the benches put between.
        "--unix",
        "off",
    ]


def bare_command(port: int, data_dir: Path, log_level: str) -> list[str]:
    return [sys.executable, __file__, "--port", str(port), "--log-level", log_level]


Command = Callable[[int, Path, str], list[str]]
"""``(port, data_dir, log_level) -> argv`` of a server."""


@contextlib.contextmanager
def serving(
    command: Command,
    name: str,
    tmp: Path,
    env: dict[str, str],
    log_level: str,
    timeout: float = 120.0,
) -> Iterator[Served]:
    """Runs ``command(port, data_dir, log_level)`` until the ``with`` block ends.

    The server's output goes to ``tmp/<name>.log`` (shown if it fails to start).
    """
    port = _free_port()
    log = tmp / f"{name}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    full_env.update(env)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command(port, tmp / "data", log_level),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
    served = Served(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{served.output()}")
            try:
                if httpx.get(served.url + "/v1/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start in {timeout:g} s:\n{served.output()}")
            time.sleep(0.1)
        yield served
    finally:
        stop(process)


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM (a graceful shutdown), then SIGKILL after ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the bare app (only when run as a script) -------------------------------------


def _bare_app():
    from fastapi import FastAPI, Request
    from fastapi.responses import Response, StreamingResponse

    app = FastAPI()
    # The bytes /download sends; grown on demand, never freed (one per server process).
    store = {"data": bytearray()}

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    @app.post("/upload")
    async def upload(request: Request) -> Response:
        body = fresh_buffer(int(request.headers["content-length"]))
        pos = 0
        async for chunk in request.stream():
            body[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        return Response(str(pos).encode(), media_type="text/plain")

    @app.get("/download")
    def download(nbytes: int) -> StreamingResponse:
        if len(store["data"]) < nbytes:
            store["data"] = bytearray(os.urandom(1 << 20)) * -(-nbytes // (1 << 20))
        view = memoryview(store["data"])[:nbytes]
        chunks = (view[i : i + _STREAM_CHUNK] for i in range(0, nbytes, _STREAM_CHUNK))
        return StreamingResponse(
            chunks,
            media_type="application/octet-stream",
            headers={"content-length": str(nbytes)},
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="the bare FastAPI app of bench_remote.py")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args()

    import uvicorn

    # The same options as `statehost serve` passes to uvicorn.run (server/cli.py).
    uvicorn.run(
        _bare_app(),
        host="127.0.0.1",
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
