"""Starting a real ``statehost serve`` subprocess on a free loopback port, for tests.

``running_server`` yields a :class:`Served` with the URL, the token and the
environment the server ran with; the server is stopped (SIGTERM, then kill)
on exit, and its output is shown if it fails to start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["Served", "free_port", "metric_value", "running_server"]


def metric_value(text: str, name: str, **labels: str) -> float:
    """A sample's value in Prometheus text (0.0 when the sample was never set)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Served:
    url: str
    token: str
    process: subprocess.Popen
    env: dict[str, str]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        """The current value of one of the server's Prometheus samples."""
        text = httpx.get(self.url + "/metrics",
                         headers={"authorization": f"Bearer {self.token}"}).text
        return metric_value(text, name, **labels)


def _start(cmd: list[str], env: dict[str, str], url: str, token: str, log: Path,
           timeout: float) -> Served:
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    served = Served(url, token, process, env, log)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"statehost serve exited with {process.returncode}:\n"
                               f"{served.output()}")
        try:
            if httpx.get(url + "/v1/health", timeout=1.0).status_code == 200:
                return served
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            _stop(process)
            raise RuntimeError(f"statehost serve did not start in {timeout} s:\n"
                               f"{served.output()}")
        time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_server(
    tmp_path: Path, *args: str, token: str | None = "test-token", cpu_devices: int = 8,
    env: dict[str, str] | None = None, timeout: float = 60.0, port: int | None = None,
    data_dir_flag: bool = True,
) -> Iterator[Served]:
    """Runs ``python -m statehost.server serve`` until the ``with`` block ends.

    The server's files go to ``tmp_path / "data"`` (``--data-dir``); with
    ``data_dir_flag=False`` no flag is passed and the server picks its own (set ``HOME`` or
    ``XDG_DATA_HOME`` in ``env``).

    Without ``port``, a free one is picked; if another process takes it before the server
    binds it (an outgoing connection's ephemeral port can), another port is tried.
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    full_env.update({"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "JAX_PLATFORMS": "cpu"})
    full_env.update(env or {})
    if token is not None:
        full_env["STATEHOST_TOKENS"] = token
    for attempt in range(3):
        chosen = port or free_port()
        cmd = [sys.executable, "-m", "statehost.server", "serve", "--port", str(chosen),
               "--cpu-devices", str(cpu_devices), *args]
        if data_dir_flag:
            cmd += ["--data-dir", str(tmp_path / "data")]
        log = tmp_path / f"server-{chosen}.log"
        try:
            served = _start(cmd, full_env, f"http://127.0.0.1:{chosen}", token or "", log,
                            timeout)
            break
        except RuntimeError as exc:
            if port is not None or attempt == 2 or "address already in use" not in str(exc):
                raise
    try:
        if token is None:
            token_file = tmp_path / "xdg" / "statehost" / "token"
            served.token = token_file.read_text().strip()
        yield served
    finally:
        _stop(served.process)
