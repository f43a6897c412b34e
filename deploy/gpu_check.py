"""The real-accelerator check that ``deploy/gpu-check.sh`` runs; prints one table.

1. starts ``statehost serve`` on this machine's accelerators (no JAX_PLATFORMS=cpu);
2. runs ``examples/parallelisation_remote.py`` against it;
3. residency: puts a model, runs a pmap step 11 times with ``pull=False``, and checks that
   the 10 repeat calls sent no state bytes and compiled nothing, that the state's buffers
   sit on the accelerator between calls (``client.info``), and that ``client.pull`` then
   gives the right values;
4. runs ``bench/bench_remote.py``'s tiny and resident cases on the accelerator;
5. runs ``bench/bench_async.py``'s tiny and compute-heavy cases on the accelerator: the
   local loop, the remote sync and async loops and ``client.loop``, over 0 and 1 ms links
   (rows whose API the client lacks print ``n/a (...)``; issue 12 adds async dispatch).

Run from the repository root: ``python deploy/gpu_check.py`` (the shell script sets up the
environment first). Exits 1 if a check fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "gpu-check-token"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _metric(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {TOKEN}"}).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def main() -> int:
    import statehost
    from statehost.util.filter import OfType

    class Model(statehost.nn.Module):
        def __init__(self, lanes: int, width: int = 4):
            super().__init__()
            self.weight = statehost.ParamState(jnp.ones((lanes, width)))

        def __call__(self, delta):
            self.weight.value = self.weight.value + delta
            return self.weight.value

    rows: list[tuple[str, str, str]] = []
    bench = bench_async = None

    def check(name: str, ok: bool, detail: str) -> None:
        rows.append((name, "ok" if ok else "FAILED", detail))

    platform = jax.devices()[0].platform
    check("local jax sees an accelerator", platform != "cpu",
          f"jax {jax.__version__}: {len(jax.devices())} x {jax.devices()[0].device_kind}")
    # Subprocesses run in this folder, not the repository root: `python -m` puts the
    # working directory first on sys.path, and the root's bare statehost/ folder would hide
    # an installed (or staged) statehost with its client and server.
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STATEHOST_", "JAX_PLAT"))}
    env.update({"STATEHOST_TOKENS": TOKEN, "XDG_CONFIG_HOME": str(tmp / "xdg")})
    log = open(tmp / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "statehost.server", "serve", "--port", str(port),
         "--data-dir", str(tmp / "data"), "--log-level", "warning", "--unix", "off"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp,
    )
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError("the server did not start:\n" + (tmp / "server.log").read_text())

        with statehost.connect(url, token=TOKEN, timeout=300) as client:
            devices = client.devices()
            check("server runs on the accelerator", devices[0].platform != "cpu",
                  f"{len(devices)} x {devices[0].platform} ({devices[0].kind})")

            # 2. the seed notebook through the client
            started = time.perf_counter()
            example = subprocess.run(
                [sys.executable, str(ROOT / "examples" / "parallelisation_remote.py")],
                env={**env, "STATEHOST_URL": url, "STATEHOST_TOKEN": TOKEN},
                capture_output=True, text=True, timeout=600, cwd=tmp,
            )
            tail = [ln for ln in example.stdout.splitlines() if ln.strip()][-1:] or [""]
            check("examples/parallelisation_remote.py", example.returncode == 0,
                  f"{time.perf_counter() - started:.1f} s; last line: {tail[0][:60]}"
                  if example.returncode == 0 else example.stderr.strip()[-300:])

            # 3. residency on the accelerator
            lanes = len(devices)
            model = Model(lanes)
            client.put("gpucheck/net", model)
            param = {0: OfType(statehost.ParamState)}
            step = client.pmap(model, axis_name="i", in_axes=0, out_axes=0,
                               state_in_axes=param, state_out_axes=param, pull=False)
            delta = np.full((lanes, 4), 0.5, np.float32)
            step(delta)
            state_in = _metric(url, "statehost_wire_bytes_total", direction="in", part="state")
            compiles = _metric(url, "statehost_compiles_total")
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                step(delta)
                times.append(time.perf_counter() - t0)
            sent = _metric(url, "statehost_wire_bytes_total", direction="in",
                           part="state") - state_in
            compiled = _metric(url, "statehost_compiles_total") - compiles
            check("10 repeat calls send no state bytes", sent == 0, f"{sent:.0f} bytes")
            check("10 repeat calls compile nothing", compiled == 0, f"{compiled:.0f} compiles")
            placed = client.info("gpucheck/net")["states"][0]["devices"]
            check("state stays on the accelerator between calls",
                  bool(placed) and all(not d.startswith(("cpu", "host")) for d in placed),
                  ", ".join(placed))
            client.pull(model)
            expected = 1.0 + 11 * 0.5
            check("pull after 11 pull=False calls", bool(np.all(
                np.asarray(model.weight.value) == expected)), f"every weight == {expected}")
            check("remote step latency (median of 10)", True,
                  f"{np.median(times) * 1e6:,.0f} us")

        # 4. the benchmark's tiny and resident cases on the accelerator
        bench = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "bench_remote.py"), "--cases", "tiny,resident",
             "--calls", "300", "--big-calls", "20", "--log-level", "warning"],
            env={**env, "BENCH_PLATFORM": platform if platform != "gpu" else "cuda"},
            capture_output=True, text=True, timeout=600, cwd=tmp,
        )
        check("bench/bench_remote.py tiny,resident", bench.returncode == 0,
              "table below" if bench.returncode == 0 else bench.stderr.strip()[-300:])

        # 5. async dispatch: bench_async's tiny and compute-heavy rows on the accelerator
        bench_async = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "bench_async.py"), "--cases", "tiny,heavy",
             "--links", "0,1", "--steps", "1000", "--heavy-steps", "20", "--blocks", "3",
             "--log-level", "warning"],
            env={**env, "BENCH_PLATFORM": platform if platform != "gpu" else "cuda"},
            capture_output=True, text=True, timeout=600, cwd=tmp,
        )
        # A row prints "n/a (...)" where the client lacks its API (not a failure here) and
        # "failed (...)" where it raised (a failure: the API is there and broke).
        notes = re.findall(r"(n/a|failed) \((?!the )(.*?)\)(?:;|$)", bench_async.stdout, re.M)
        missing = sorted({why for kind, why in notes if kind == "n/a"})
        failed = sorted({why for kind, why in notes if kind == "failed"})
        detail = "; ".join(["table below"] + [f"n/a: {', '.join(missing)}"] * bool(missing)
                           + [f"failed: {failed[0][:200]}"] * bool(failed))
        check("bench/bench_async.py tiny,heavy", bench_async.returncode == 0 and not failed,
              detail if bench_async.returncode == 0 else bench_async.stderr.strip()[-300:])
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()

    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':{width}s} | result | detail")
    print(f"{'-' * width}-+--------+-{'-' * 50}")
    for name, result, detail in rows:
        print(f"{name:{width}s} | {result:6s} | {detail}")
    if bench is not None and bench.returncode == 0:
        keep = re.compile(r"^(case|tiny|resident|-|targets|measured|  )")
        print("\nbench/bench_remote.py on this machine:")
        print("\n".join(ln for ln in bench.stdout.splitlines() if keep.match(ln)))
    if bench_async is not None and bench_async.returncode == 0:
        lines = bench_async.stdout.splitlines()
        start = next((i for i, ln in enumerate(lines) if ln.startswith("per step")), 0)
        print("\nbench/bench_async.py on this machine:")
        print("\n".join(lines[start:]))
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
