"""CPU per asynchronous tiny call, of the server and of the client, measured apart.

Wall time on a shared 2-core machine moves with everyone else's load; CPU time per call
does not (much), and it is what bounds throughput when client and server share the
cores. This starts a real ``statehost serve`` (8 CPU devices) as a subprocess, warms a
``client.pmap`` of the seed's ``Affine`` (8x4) with ``pull=False`` up, then issues
``--calls`` asynchronous calls and waits for them (``client.sync()``), several times
(``--repeats``), and prints, per call, the median over repeats of:

- server CPU µs: ``utime + stime`` of the server process (``/proc/<pid>/stat``), split into
  its event-loop thread (the main thread: uvicorn, the WebSocket, the channel) and every
  other thread (the scheduler's workers, XLA's);
- client CPU µs: the same for this process, split into the main thread (the user's loop)
  and the others (the stream's reader thread);
- wall µs.

``--profile DIR`` runs the server under cProfile (every thread, merged) and writes
``DIR/server.pstats`` plus the top functions by own time to ``DIR/server.txt`` when the
server exits (``--profile-clock cpu``: timed by each thread's CPU clock, so a function's
time is what it cost, not how long its thread waited for a core); ``--client-profile``
does the same for this process's main thread.
Profiling slows both sides: the CPU table of a profiled run is not comparable.

``--read-each`` reads every call's output (``np.asarray``): one round trip a call, as a
loop that prints each step's loss, instead of calls pipelined and one ``client.sync()``.

Run: ``python bench/_profile_stream.py [--calls 2000] [--repeats 5] [--read-each]
[--profile DIR]``.
To compare with another commit, unpack its ``statehost``, ``client`` and ``server`` as
one package tree (``pkg/statehost``, ``pkg/statehost/client``, ``pkg/statehost/server``)
and run this from ``bench/`` with ``PYTHONPATH=pkg`` (the server inherits it), turn about
with the working tree's runs: on a shared machine only runs close in time compare.
Nothing here asserts a timing (STYLE rule 40).
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)

import argparse  # noqa: E402
import cProfile  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import secrets  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _remote_server import serving, statehost_command  # noqa: E402

import statehost  # noqa: E402
from statehost.util.filter import OfType  # noqa: E402

PARAM = {0: OfType(statehost.ParamState)}
MAPPING = dict(axis_name="devices", in_axes=0, out_axes=0, state_in_axes=PARAM,
               state_out_axes=PARAM)
_TICK = os.sysconf("SC_CLK_TCK")


class Affine(statehost.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = statehost.ParamState(jnp.ones((8, 4), jnp.float32))

    def __call__(self, delta):
        self.weight.value = self.weight.value + delta
        return self.weight.value


def thread_cpu(pid: int) -> tuple[float, float]:
    """Seconds of CPU of process ``pid``: (its main thread, all its other threads)."""
    main = other = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # the thread ended meanwhile
            continue
        seconds = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
        if int(tid) == pid:
            main += seconds
        else:
            other += seconds
    return main, other


def _threads(pid: int) -> list[tuple[int, str, float]]:
    """``(tid, name, seconds of CPU)`` of each thread of process ``pid``."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                name, fields = f.read().split(" (", 1)[1].rsplit(")", 1)
        except FileNotFoundError:
            continue
        fields = fields.split()
        found.append((int(tid), name, (int(fields[11]) + int(fields[12])) / _TICK))
    return found


def cpu_by_thread(pid: int) -> dict[str, float]:
    """Seconds of CPU of process ``pid`` per thread, keyed ``tid:name`` (``main`` for the
    main thread). Here every other thread is named ``python``: the scheduler's workers
    and XLA's CPU device threads (one per device) alike."""
    return {"main" if tid == pid else f"{tid}:{name}": cpu for tid, name, cpu in _threads(pid)}


def cpu_by_name(pid: int) -> dict[str, float]:
    """Seconds of CPU of process ``pid`` per thread name (``comm``: XLA names its pools)."""
    found: dict[str, float] = {}
    for tid, name, cpu in _threads(pid):
        key = "main" if tid == pid else name
        found[key] = found.get(key, 0.0) + cpu
    return found


def profiled_command(out: Path):
    """``statehost serve`` under cProfile in every thread (see ``_serve_profiled``)."""

    def command(port: int, data_dir: Path, log_level: str) -> list[str]:
        argv = statehost_command(port, data_dir, log_level)
        return [sys.executable, __file__, "--serve-profiled", str(out), "--", *argv[3:]]

    return command


def _serve_profiled(out: Path, argv: list[str]) -> int:
    """Runs the server CLI with one cProfile per thread; merges and writes them at exit."""
    import threading

    profiles: list[cProfile.Profile] = []
    # CPU time of each thread (its own clock), not wall time: what a function costs, not
    # how long its thread waited for a core another process held.
    timer = time.thread_time if os.environ.get("_PROFILE_CLOCK") == "cpu" else time.perf_counter

    def start(*_: object) -> None:  # the first profile event of a new thread
        profile = cProfile.Profile(timer)
        profiles.append(profile)
        profile.enable()  # replaces this hook for the thread

    threading.setprofile(start)
    main = cProfile.Profile(timer)
    profiles.append(main)
    from statehost._cli import main as cli_main

    main.enable()
    try:
        return cli_main(argv)
    finally:
        main.disable()
        for p in profiles:
            p.create_stats()
        out.mkdir(parents=True, exist_ok=True)
        stats = pstats.Stats(profiles[0])
        for p in profiles[1:]:
            if p.stats:
                stats.add(p)
        stats.dump_stats(out / "server.pstats")
        with open(out / "server.txt", "w") as f:
            pstats.Stats(str(out / "server.pstats"), stream=f).sort_stats("tottime") \
                .print_stats(60)


def measure(client, calls: int, repeats: int, server_pid: int, client_profile: Path | None,
            read_each: bool = False) -> list[dict[str, float]]:
    fun = client.pmap(Affine(), **MAPPING, pull=False)
    delta = np.full((8, 4), 0.5, np.float32)
    for _ in range(200):  # the first call is synchronous; the rest warm the path
        out = fun(delta)
    client.sync()
    np.asarray(out)
    me = os.getpid()
    results = []
    profile = cProfile.Profile() if client_profile is not None else None
    named0, threads0 = cpu_by_name(server_pid), cpu_by_thread(server_pid)
    for _ in range(repeats):
        s0, c0, w0 = thread_cpu(server_pid), thread_cpu(me), time.perf_counter()
        if profile is not None:
            profile.enable()
        for _ in range(calls):
            out = fun(delta)
            if read_each:  # one round trip a call: the reply brings the output
                np.asarray(out)
        client.sync()
        if profile is not None:
            profile.disable()
        w1, s1, c1 = time.perf_counter(), thread_cpu(server_pid), thread_cpu(me)
        np.asarray(out)
        us = 1e6 / calls
        results.append({
            "server loop": (s1[0] - s0[0]) * us, "server other": (s1[1] - s0[1]) * us,
            "client main": (c1[0] - c0[0]) * us, "client other": (c1[1] - c0[1]) * us,
            "wall": (w1 - w0) * us})
    named1, threads1 = cpu_by_name(server_pid), cpu_by_thread(server_pid)
    total = calls * repeats
    print("server CPU µs per call by thread name:", ", ".join(
        f"{k} {(named1[k] - named0.get(k, 0.0)) * 1e6 / total:.0f}" for k in sorted(named1)
        if named1[k] - named0.get(k, 0.0) > 0))
    busy = sorted(((v - threads0.get(k, 0.0)) * 1e6 / total, k) for k, v in threads1.items())
    print("server CPU µs per call by thread, busiest first:", ", ".join(
        f"{k} {us:.0f}" for us, k in reversed(busy) if us >= 1))
    if profile is not None:
        client_profile.mkdir(parents=True, exist_ok=True)
        profile.dump_stats(client_profile / "client.pstats")
        with open(client_profile / "client.txt", "w") as f:
            pstats.Stats(profile, stream=f).sort_stats("tottime").print_stats(60)
    return results


def report(results: list[dict[str, float]]) -> str:
    """The table: per call, the median and the least over the repeats (the least is the
    steadier figure on a machine that others load)."""
    rows = [("server CPU", ("server loop", "server other")),
            ("  event-loop thread", ("server loop",)),
            ("  other threads (workers)", ("server other",)),
            ("client CPU", ("client main", "client other")),
            ("  main thread", ("client main",)),
            ("  other threads (reader)", ("client other",)),
            ("wall", ("wall",))]
    lines = [f"{'per async tiny call, µs':<28}{'median':>10}{'least':>10}"]
    for label, keys in rows:
        values = [sum(r[k] for k in keys) for r in results]
        lines.append(f"{label:<28}{statistics.median(values):>10.0f}{min(values):>10.0f}")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-profiled":
        sys.exit(_serve_profiled(Path(sys.argv[2]), sys.argv[4:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", type=Path, default=None,
                        help="run the server under cProfile; write its stats here")
    parser.add_argument("--profile-clock", choices=("wall", "cpu"), default="wall",
                        help="what --profile times: wall time, or each thread's CPU time")
    parser.add_argument("--read-each", action="store_true",
                        help="read every call's output: one round trip a call, as a loop "
                        "that prints each step's loss")
    parser.add_argument("--client-profile", type=Path, default=None,
                        help="profile this process's calls; write the stats here")
    args = parser.parse_args()
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as tmp:
        command = statehost_command if args.profile is None else profiled_command(args.profile)
        env = {"STATEHOST_TOKENS": token, "XDG_CONFIG_HOME": str(Path(tmp) / "xdg"),
               "_PROFILE_CLOCK": args.profile_clock}
        with serving(command, "statehost", Path(tmp), env,
                     "warning") as served:
            with statehost.connect(served.url, token=token, timeout=300.0) as client:
                results = measure(client, args.calls, args.repeats, served.process.pid,
                                  args.client_profile, args.read_each)
    print(report(results))
    if args.profile is not None:
        print(f"server profile: {args.profile / 'server.txt'}")


if __name__ == "__main__":
    main()
