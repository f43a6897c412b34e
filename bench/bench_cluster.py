"""One process with 8 devices against a group of 2 processes with 4 each (issue 14).

One run starts both servers as subprocesses on free loopback ports, side by side:

* ``1 x 8``: ``statehost serve --cpu-devices 8``, the single-host server;
* ``2 x 4``: a ``jax.distributed`` group of two ``statehost serve --cpu-devices 4``
  processes (gloo collectives), the leader (process 0) serving HTTP, the follower
  running every device operation the leader broadcasts to it.

Two cases, each measured on both servers in turns of blocks of calls (so both see the
same machine load), through the same client API:

1. ``tiny``: the seed's ``Affine`` module (``ParamState`` 8x4 float32, one lane per
   device), a new 8x4 ``delta`` per call, the output read each call;
2. ``resident``: the same module with a 128 MiB weight (8x4194304 float32) kept on the
   devices and an 8x1 ``delta`` broadcast over it; 8x4 of the new weight comes back.

Below the table, per case: the group's median over the single process's (target for
``tiny``: <= 1.5x), what the group adds per call in microseconds (the broadcast to the
follower and the follower's acknowledgement), and the frame bytes per call on the client's
wire of each server (``statehost_wire_bytes_total``; the target is no extra bytes: the
group moves the request once, to the leader) next to the leader's broadcast bytes per
call to its follower, when the server counts them; then each server process's CPU per
call (``utime + stime`` from ``/proc/<pid>/stat``, over its own blocks of calls), the
leader's and the follower's apart.

Run: ``make bench`` or ``python bench/bench_cluster.py [--calls N] [--big-calls N]
[--cases tiny,resident]``. Nothing here asserts a timing (STYLE rule 40).
"""

import jax

# The client traces nothing here, but keeps the servers' lane count (8).
jax.config.update("jax_num_cpu_devices", 8)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _remote_server import Served, serving, statehost_command, stop  # noqa: E402

import statehost  # noqa: E402
from statehost.util.filter import OfType  # noqa: E402

LANES = 8
BIG = 128 << 20  # bytes of the resident weight
BIG_WIDTH = BIG // (4 * LANES)
PARAM = {0: OfType(statehost.ParamState)}
SINGLE, GROUP = "1 process x 8 devices", "2 processes x 4 devices"
TINY_TARGET = 1.5  # the group's tiny call over the single process's (issue 14)


class Affine(statehost.nn.Module):
    """The seed notebook's module; returns only the first 4 columns of the new weight.

    bench_remote has the same class, but one imported from there would be pickled by
    reference, which the servers cannot import; defined in ``__main__``, cloudpickle sends
    it by value."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = statehost.ParamState(jnp.ones((LANES, width), jnp.float32))

    def __call__(self, delta):
        self.weight.value = self.weight.value + delta
        return self.weight.value[:4]


# -- the servers ---------------------------------------------------------------------


def group_command(coordinator: str, index: int) -> Callable[[int, Path, str], list[str]]:
    """``statehost serve`` as process ``index`` of a 2-process group at ``coordinator``."""

    def command(port: int, data_dir: Path, log_level: str) -> list[str]:
        argv = statehost_command(port, data_dir, log_level)
        argv[argv.index("--cpu-devices") + 1] = "4"
        return [*argv, "--coordinator", coordinator, "--num-processes", "2",
                "--process-id", str(index)]

    return command


@contextlib.contextmanager
def group(tmp: Path, env: dict[str, str], log_level: str
          ) -> Iterator[tuple[Served, subprocess.Popen]]:
    """A 2-process group until the ``with`` block ends; yields its leader and follower.

    The follower is started first and not waited on: ``jax.distributed`` holds every
    process until the whole group has joined, and the leader answers ``/v1/health`` only
    then.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{sock.getsockname()[1]}"
    for name in ("leader", "follower"):
        (tmp / name).mkdir()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STATEHOST_")}
    full_env.update(env)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        follower_port = sock.getsockname()[1]
    log = tmp / "follower" / "follower.log"
    with open(log, "wb") as out:
        follower = subprocess.Popen(
            group_command(coordinator, 1)(follower_port, tmp / "follower" / "data", log_level),
            stdout=out, stderr=subprocess.STDOUT, env=full_env)
    try:
        with serving(group_command(coordinator, 0), "leader", tmp / "leader", env, log_level,
                     timeout=240) as leader:
            yield leader, follower
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\nthe follower's log:\n{log.read_text(errors='replace')}") \
            from None
    finally:
        stop(follower)  # it has stopped with its leader, normally


# -- timing --------------------------------------------------------------------------

Step = Callable[[], Any]


def remote_step(client: Any, model: Affine, delta: np.ndarray) -> Step:
    fun = client.pmap(model, axis_name="devices", state_in_axes=PARAM, state_out_axes=PARAM,
                      pull=False)
    return lambda: np.asarray(fun(delta))  # read each call: one full round trip


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` used so far, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def run_calls(step: Step, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def wire_bytes(metrics: httpx.Client) -> float:
    """Frame bytes in and out on the client's wire so far (every part)."""
    return _metric_sum(metrics, "statehost_wire_bytes_total")


def broadcast_bytes(metrics: httpx.Client) -> float | None:
    """Bytes the leader sent its followers so far, if it counts them."""
    return _metric_sum(metrics, "statehost_cluster_broadcast_bytes_total", missing=None)


def _metric_sum(metrics: httpx.Client, name: str, missing: Any = 0.0) -> Any:
    from prometheus_client.parser import text_string_to_metric_families

    found = [s.value for f in text_string_to_metric_families(metrics.get("/metrics").text)
             for s in f.samples if s.name == name]
    return sum(found) if found else missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="timed calls per tiny row")
    parser.add_argument("--big-calls", type=int, default=30,
                        help="timed calls per resident row")
    parser.add_argument("--cases", default="tiny,resident")
    parser.add_argument("--log-level", default="warning")
    parser.add_argument("--quick", action="store_true", help="fewer calls (60 and 10)")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.big_calls = 60, 10
    wanted = args.cases.split(",")
    print(f"jax {jax.__version__}; the servers: 8 CPU devices in one process, and 2 "
          "processes of 4 (jax.distributed, gloo)")

    token = secrets.token_urlsafe(16)
    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as tmp_name:
        tmp = Path(tmp_name)
        env = {"XDG_CONFIG_HOME": str(tmp / "xdg"), "STATEHOST_TOKENS": token,
               "JAX_PLATFORMS": "cpu"}
        (tmp / "single").mkdir()
        with (serving(statehost_command, "single", tmp / "single", env,
                      args.log_level) as single,
              group(tmp, env, args.log_level) as (leader, follower)):
            pids = {SINGLE: {"server": single.process.pid},
                    GROUP: {"leader": leader.process.pid, "follower": follower.pid}}
            rows = run_cases(single, leader, token, wanted, args, pids)
    print_results(rows)


def run_cases(single: Served, leader: Served, token: str, wanted: list[str],
              args: argparse.Namespace, pids: dict[str, dict[str, int]]
              ) -> dict[str, dict[str, Any]]:
    """Per case and server: call times, wire and broadcast bytes per call, and each
    server process's CPU seconds over its own blocks of calls."""
    auth = {"authorization": f"Bearer {token}"}
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for name, served in ((SINGLE, single), (GROUP, leader)):
            client = stack.enter_context(statehost.connect(served.url, token=token,
                                                           timeout=300))
            metrics = stack.enter_context(httpx.Client(base_url=served.url, headers=auth,
                                                       timeout=60))
            servers[name] = (client, metrics)
        for case in wanted:
            width, calls = (4, args.calls) if case == "tiny" else (BIG_WIDTH, args.big_calls)
            delta = np.full((LANES, 4 if case == "tiny" else 1), 0.5, np.float32)
            steps = {name: remote_step(client, Affine(width), delta)
                     for name, (client, _) in servers.items()}
            for step in steps.values():  # compile, upload the weight, warm up
                run_calls(step, 3)
            before = {name: (wire_bytes(m), broadcast_bytes(m))
                      for name, (_, m) in servers.items()}
            times: dict[str, list[float]] = {name: [] for name in steps}
            cpu = {name: dict.fromkeys(pids[name], 0.0) for name in steps}
            block = max(1, calls // 10)
            for done in range(0, calls, block):
                for name, step in steps.items():
                    cpu0 = {role: cpu_seconds(pid) for role, pid in pids[name].items()}
                    times[name] += run_calls(step, min(block, calls - done))
                    for role, pid in pids[name].items():
                        cpu[name][role] += cpu_seconds(pid) - cpu0[role]
            per_call = {}
            for name, (_, m) in servers.items():
                wire0, cast0 = before[name]
                cast1 = broadcast_bytes(m)
                per_call[name] = ((wire_bytes(m) - wire0) / calls,
                                  None if cast1 is None else (cast1 - (cast0 or 0)) / calls)
            results[case] = {"times": times, "bytes": per_call, "cpu": cpu}
            del steps
    return results


def print_results(results: dict[str, dict[str, Any]]) -> None:
    print("\nper-call latency in microseconds (the output read each call); bytes per call: "
          "frames on the client's wire, and the leader's broadcast to its follower")
    header = ["case", "server", "n", "median us", "p90 us", "wire B/call", "broadcast B/call"]
    table = [header]
    for case, result in results.items():
        for name, ts in result["times"].items():
            wire, cast = result["bytes"][name]
            table.append([case, name, str(len(ts)), f"{np.median(ts) * 1e6:,.1f}",
                          f"{np.percentile(ts, 90) * 1e6:,.1f}", f"{wire:,.0f}",
                          "-" if cast is None else f"{cast:,.0f}"])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, row in enumerate(table):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]
        print(" | ".join(cells))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print("\ntargets (issue 14): tiny 2x4 / 1x8 <= 1.5x; no extra wire bytes per call")
    for case, result in results.items():
        one, two = (float(np.median(result["times"][n])) for n in (SINGLE, GROUP))
        ratio = two / one
        wire_one, wire_two = (result["bytes"][n][0] for n in (SINGLE, GROUP))
        verdict = ""
        if case == "tiny":
            verdict = f" target <= {TINY_TARGET}x: {'met' if ratio <= TINY_TARGET else 'NOT MET'}"
        print(f"  {case:9s} {ratio:5.2f}x{verdict}; the group adds {(two - one) * 1e6:,.1f} us "
              f"per call; wire bytes per call {wire_two:,.0f} vs {wire_one:,.0f} "
              f"({'no extra' if wire_two <= wire_one * 1.01 + 8 else 'MORE'})")
    print("\nserver CPU per call in microseconds (user + system, over each server's own "
          "blocks of calls)")
    for case, result in results.items():
        for name, roles in result.get("cpu", {}).items():
            calls = len(result["times"][name])
            split = ", ".join(f"{role} {seconds * 1e6 / calls:,.0f}"
                              for role, seconds in roles.items())
            total = sum(roles.values()) * 1e6 / calls
            print(f"  {case:9s} {name:24s} {total:8,.0f} us ({split})")


if __name__ == "__main__":
    sys.exit(main())
