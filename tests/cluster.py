"""Starting a real server group (``statehost serve --coordinator ...``) on loopback, for tests.

``running_group`` starts ``count`` processes of ``cpu_devices`` CPU devices each, as real
subprocesses joined by ``jax.distributed`` (gloo collectives): process 0 leads and serves
the API, the others follow. It yields a :class:`Group` once every process's
``GET /v1/health`` answers 200, and stops them on exit (the leader first: it tells its
followers to stop).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.serving import Served, _stop, free_port

__all__ = ["Group", "health", "running_group"]


@dataclass
class Group:
    leader: Served
    followers: list[Served]

    @property
    def processes(self) -> list[Served]:
        return [self.leader, *self.followers]


def health(served: Served) -> tuple[int, dict]:
    """The status and JSON of a process's ``GET /v1/health``."""
    answer = httpx.get(served.url + "/v1/health", timeout=5.0)
    return answer.status_code, answer.json()


@contextlib.contextmanager
def running_group(tmp_path: Path, *args: str, count: int = 2, cpu_devices: int = 4,
                  heartbeat_timeout: float = 2.0, token: str = "test-token",
                  timeout: float = 120.0, env: dict[str, str] | None = None
                  ) -> Iterator[Group]:
    """Runs a group of ``count`` server processes until the ``with`` block ends; their
    files go to ``tmp_path / f"data-{index}"``, so a second group there is a restart."""
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    env.update({"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "JAX_PLATFORMS": "cpu",
                "STATEHOST_TOKENS": token, **extra})
    coordinator = f"127.0.0.1:{free_port()}"
    processes: list[Served] = []
    try:
        for index in range(count):
            port = free_port()
            cmd = [sys.executable, "-m", "statehost.server", "serve", "--port", str(port),
                   "--cpu-devices", str(cpu_devices), "--coordinator", coordinator,
                   "--num-processes", str(count), "--process-id", str(index),
                   "--heartbeat-timeout", str(heartbeat_timeout),
                   "--data-dir", str(tmp_path / f"data-{index}"), "--unix", "off", *args]
            log = tmp_path / f"process-{index}.log"
            with open(log, "wb") as out:
                process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            processes.append(Served(f"http://127.0.0.1:{port}", token, process, env, log))
        deadline = time.monotonic() + timeout
        waiting = list(processes)
        while waiting:
            served = waiting[0]
            if served.process.poll() is not None:
                logs = "\n".join(f"--- process {i}:\n{p.output()}"
                                 for i, p in enumerate(processes))
                raise RuntimeError(f"a server process exited with "
                                   f"{served.process.returncode}:\n{logs}")
            try:
                if httpx.get(served.url + "/v1/health", timeout=1.0).status_code == 200:
                    waiting.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- process {i}:\n{p.output()}"
                                 for i, p in enumerate(processes))
                raise RuntimeError(f"the group did not start in {timeout} s:\n{logs}")
            time.sleep(0.1)
        yield Group(processes[0], processes[1:])
    finally:
        for served in processes:  # the leader first: it tells its followers to stop
            _stop(served.process)
