"""How long the ``statehost`` command takes to start, against a bare Python.

Each row runs one command in a fresh process, as an operator types it, ``--runs`` times:
``statehost --help``, ``statehost token list`` (on an empty data directory) and
``statehost ls`` against a closed loopback port (it fails at once, so the row is start-up
plus one refused connection). The floor is ``python -c pass`` with the same interpreter.
The table shows the median wall time and how many floors it is.

Run: ``make bench`` or ``python bench/bench_cli.py [--runs N]``.
Nothing here asserts a timing (STYLE rule 40).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _median_seconds(cmd: list[str], runs: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=120, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs per row (default 7)")
    args = parser.parse_args()

    script = Path(sys.executable).with_name("statehost")
    if not script.exists():
        print(f"bench_cli: no {script}; install the project first (make test or make serve)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
        env.update({"XDG_CONFIG_HOME": str(Path(tmp) / "xdg"), "JAX_PLATFORMS": "cpu"})
        url = f"http://127.0.0.1:{_closed_port()}"
        rows = [
            ("python -c pass (floor)", [sys.executable, "-c", "pass"]),
            ("statehost --help", [str(script), "--help"]),
            ("statehost token list", [str(script), "token", "list", "--data-dir",
                                      str(Path(tmp) / "data")]),
            ("statehost ls (nothing running)", [str(script), "ls", "--url", url,
                                                "--timeout", "2"]),
        ]
        medians = [(name, _median_seconds(cmd, args.runs, env)) for name, cmd in rows]

    floor = medians[0][1]
    print(f"statehost command start-up: median of {args.runs} runs, {os.cpu_count()} CPUs")
    width = max(len(name) for name, _ in medians)
    print(f"  {'command'.ljust(width)}  {'median s':>8}  {'x floor':>7}")
    for name, seconds in medians:
        print(f"  {name.ljust(width)}  {seconds:8.3f}  {seconds / floor:7.1f}")


if __name__ == "__main__":
    main()
