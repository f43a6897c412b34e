"""Per-call cost of running statehost remotely, side by side with local runs and a bare floor.

One run starts two servers as subprocesses on free loopback ports: a real ``statehost
serve`` (8 CPU devices) and a bare FastAPI app under the same ``uvicorn.run`` options
(``bench/_remote_server.py``; httptools when installed). Four cases, each with its own
rows, which take turns in blocks of calls so that they see the same machine load:

1. ``tiny``: the seed's ``Affine`` module, ``ParamState`` of shape 8x4 float32, a new
   8x4 ``delta`` per call, ``state_in_axes``/``state_out_axes`` ``{0: OfType(ParamState)}``.
   Rows: raw ``jax.pmap`` of the same update (the weights fed back in); local
   ``statehost.transform.pmap``; remote ``client.pmap`` with ``pull=True`` (the new state
   comes back each call) and ``pull=False`` (it stays on the server); the bare floor, a
   100-byte POST echoed back by the bare app through a reused ``httpx.Client``.
2. ``resident``: the same module with a 128 MiB weight (8x4194304 float32) and an 8x1
   ``delta`` broadcast over it; the call returns only 8x4 of the new weight, so a few
   hundred bytes travel each way. Remote with ``pull=False``: the weight stays on the
   server. Compared: remote minus local statehost pmap, against the bare round trip.
3. ``upload``: ``jit(total)`` (``total(x) = x.sum()``) of a 128 MiB float32 numpy argument,
   local (``jax.jit``, statehost ``jit``) and remote (``client.jit``), against a bare chunked
   upload of 128 MiB (httpx, 1 MiB memoryview chunks, explicit Content-Length) that the
   bare app reads into one ``np.empty`` buffer (see ``_remote_server.fresh_buffer``).
   Compared: 128 MiB over remote minus local statehost jit (the server runs that same
   step after the upload), against the bare upload's MB/s.
4. ``pull``: ``client.pull(model)`` of the resident 128 MiB weight, against a local
   128 MiB host copy (``np.array(copy=True)`` of a sharded array: what memory bandwidth
   allows) and a bare 128 MiB download (streamed in 4 MiB chunks; httpx ``iter_raw()``
   read into one ``np.empty`` buffer).

5. ``unix``: the tiny case's ``client.pmap`` (``pull=True``) over TCP loopback and over the
   Unix socket of a second ``statehost serve`` (``--unix PATH``, same options otherwise),
   by two clients of that same server, one kept on TCP.
6. ``shm``: ``client.push`` (the value set anew before each, so it is uploaded) and
   ``client.pull`` of a 128 MiB state by the same two clients, over TCP and over the Unix
   socket, where its bytes go by shared memory (``server/shared_memory.py``), against
   the host's own memcpy of 128 MiB (``np.copyto`` into a preallocated array) in the same
   run.

Plus a Ray actor holding the same module, when ``ray`` is importable.

The ``unix`` and ``shm`` rows also count CPU time per call, this process's and the
server's (``/proc/<pid>/stat``), which the machine's other load moves less than wall time.

Local rows get numpy deltas and arguments, as the server does (it receives numpy), and
block on their outputs and new state values. Remote outputs arrive as ``jax.Array``s
made from the host data the reply carried, so a returned remote call is complete. Below
the table: the targets and the measured ratios, and the mean server-side ``/v1/call``
time (from ``/metrics``) per case.

Run: ``make bench`` or ``python bench/bench_remote.py [--calls N] [--big-calls N]
[--cases tiny,resident] [--quick]``. On a machine with accelerators, ``BENCH_PLATFORM=cuda``
runs both sides there, with one lane per device (``deploy/gpu-check.sh`` does this).
Nothing here asserts a timing (STYLE rule 40).
"""

import jax

# pmap needs 8 devices; on a CPU-only host this must be set before any backend starts.
jax.config.update("jax_num_cpu_devices", 8)

from statehost.server.allocator import limit_malloc_arenas  # noqa: E402

# The local rows run the server's device work in this process: with the server's
# allocator setting, or a step's fresh outputs page-fault here and not there.
limit_malloc_arenas()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import secrets  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import httpx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _remote_server import bare_command, fresh_buffer, serving, statehost_command  # noqa: E402

import statehost  # noqa: E402
from statehost.transform import jit, pmap  # noqa: E402
from statehost.util.filter import OfType  # noqa: E402

# "cpu" (8 virtual devices, the default) or an accelerator platform such as "cuda", where
# the lanes are that platform's devices.
PLATFORM = os.environ.get("BENCH_PLATFORM", "cpu")
LANES = 8 if PLATFORM == "cpu" else len(jax.devices(PLATFORM))
BIG = 128 << 20  # bytes of the resident state, the upload and the pull
BIG_WIDTH = BIG // (4 * LANES)  # the resident weight is (LANES, BIG_WIDTH) float32
ECHO = 100  # bytes of the bare round trip's body
CHUNK = 1 << 20  # upload chunks, as the client's Http.frame sends them
PARAM = {0: OfType(statehost.ParamState)}
TARGETS = {
    "tiny": "remote client.pmap (pull=True) / bare round trip <= 1.3x",
    "resident": "(remote client.pmap - local statehost pmap) / bare round trip <= 1.3x",
    "upload": "128 MiB / (remote client.jit - local statehost jit) >= 0.9x bare upload MB/s",
    "pull": "client.pull >= 1 GB/s",
    "unix": "tiny client.pmap over the Unix socket <= 0.8x over TCP",
    "shm": "128 MiB push and pull over the Unix socket (shared memory) >= 0.5x host memcpy MB/s",
}

Step = Callable[[], Any]
"""One timed call: runs once and returns what to block on."""


class Affine(statehost.nn.Module):
    """The seed notebook's module; returns only the first 4 columns of the new weight."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = statehost.ParamState(jnp.ones((LANES, width), jnp.float32))

    def __call__(self, delta):
        self.weight.value = self.weight.value + delta
        return self.weight.value[:4]  # per lane: all of tiny's 4, 16 bytes of resident's


def total(x):
    return x.sum()


# -- timing ----------------------------------------------------------------------


def run_calls(step: Step, calls: int) -> list[float]:
    """Seconds taken by each of ``calls`` calls, each blocked on its result."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(steps: dict[str, Step], calls: int, block: int) -> dict[str, list[float]]:
    """``calls`` timed calls of every step, the steps taking turns in blocks of ``block``."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for done in range(0, calls, block):
        for name, step in steps.items():
            times[name] += run_calls(step, min(block, calls - done))
    return times


def server_call_seconds(metrics: httpx.Client) -> tuple[float, float]:
    """``(sum, count)`` of the server's ``statehost_call_seconds`` histogram."""
    text = metrics.get("/metrics").text
    found = dict(re.findall(r"^statehost_call_seconds_(sum|count) (\S+)$", text, re.M))
    return float(found["sum"]), float(found["count"])


# -- one step function per row ------------------------------------------------------


def raw_pmap_step(width: int, delta: np.ndarray) -> Step:
    fun = jax.pmap(lambda w, d: (w + d, (w + d)[:4]), axis_name="devices")
    box = [fun(jnp.ones((LANES, width), jnp.float32), delta)[0]]  # sharded, as pmap leaves it

    def step():
        box[0], out = fun(box[0], delta)
        return box[0], out

    return step


def local_pmap_step(width: int, delta: np.ndarray) -> Step:
    model = Affine(width)
    fun = pmap(model, axis_name="devices", state_in_axes=PARAM, state_out_axes=PARAM)
    return lambda: (fun(delta), model.weight.value)


def remote_pmap_step(client: Any, model: Affine, delta: np.ndarray, pull: bool) -> Step:
    fun = client.pmap(
        model, axis_name="devices", state_in_axes=PARAM, state_out_axes=PARAM, pull=pull
    )
    return lambda: fun(delta)


def bare_echo_step(bare: httpx.Client) -> Step:
    body = secrets.token_bytes(ECHO)

    def step():
        response = bare.post("/echo", content=body)
        assert response.status_code == 200 and len(response.content) == ECHO, response
        return None

    return step


def bare_upload_step(bare: httpx.Client, data: np.ndarray) -> Step:
    view = memoryview(data).cast("B")
    headers = {"content-type": "application/octet-stream", "content-length": str(view.nbytes)}

    def step():
        chunks = (view[i : i + CHUNK] for i in range(0, view.nbytes, CHUNK))
        response = bare.post("/upload", content=chunks, headers=headers)
        assert response.status_code == 200 and int(response.text) == view.nbytes, response
        return None

    return step


def bare_download_step(bare: httpx.Client, nbytes: int) -> Step:
    def step():
        with bare.stream("GET", "/download", params={"nbytes": nbytes}) as response:
            view, pos = fresh_buffer(int(response.headers["content-length"])), 0
            for chunk in response.iter_raw():  # no chunk_size: httpx would re-join pieces
                view[pos : pos + len(chunk)] = chunk
                pos += len(chunk)
        assert pos == nbytes, pos
        return None

    return step


# -- Ray (optional) ---------------------------------------------------------------


def ray_problem() -> str | None:
    """Why the Ray rows cannot run, or ``None`` when they can."""
    try:
        import ray  # noqa: F401
    except Exception as exc:  # an ImportError, or a broken install
        return f"ray not importable ({type(exc).__name__}: {exc}); rows skipped"
    return None


def ray_actor(width: int) -> Any:
    """A Ray actor holding an ``Affine(width)`` and a local statehost pmap of it."""
    import ray

    if not ray.is_initialized():
        env = {"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(LANES)}
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})

    @ray.remote(num_cpus=0)  # several actors must fit on a 2-core machine
    class Holder:
        def __init__(self, width: int):
            self.model = Affine(width)
            self.fun = pmap(
                self.model, axis_name="devices", state_in_axes=PARAM, state_out_axes=PARAM
            )
            self.total = jax.jit(total)

        def step(self, delta):
            return np.asarray(self.fun(delta))

        def sum(self, x):
            return np.asarray(self.total(x))

        def weight(self):
            return np.asarray(self.model.weight.value)

    return Holder.remote(width)


def ray_step(actor: Any, method: str, *args: Any) -> Step:
    import ray

    call = getattr(actor, method)
    return lambda: ray.get(call.remote(*args))


# -- the table ---------------------------------------------------------------------


def fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def print_table(rows: list[list[str]]) -> None:
    header = ["case", "row", "n", "median us", "p90 us", "MB/s"]
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table if len(r) > 1) for i in range(len(header))]
    for i, row in enumerate(table):
        if len(row) == 1:  # a separator between cases
            print("-+-".join("-" * w for w in widths))
            continue
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:], widths[2:], strict=True)]
        print(" | ".join(cells))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


class Results:
    """Timed rows, by case, in the order measured."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []
        self.medians: dict[tuple[str, str], float] = {}

    def add(self, case: str, times: dict[str, list[float]], nbytes: int | None = None) -> None:
        if self.rows:
            self.rows.append(["-"])
        for name, ts in times.items():
            median = float(np.median(ts))
            self.medians[case, name] = median
            rate = f"{nbytes / median / 1e6:,.0f}" if nbytes else ""
            p90 = float(np.percentile(ts, 90))
            self.rows.append([case, name, str(len(ts)), fmt_us(median), fmt_us(p90), rate])


# -- the cases: each returns its rows' steps ---------------------------------------


class Rig:
    """What every case needs: the clients, and the Ray actors while Ray works."""

    def __init__(self, client: Any, bare: httpx.Client, ray_problem: str | None):
        self.client, self.bare, self.ray_problem = client, bare, ray_problem
        self.resident = Affine(BIG_WIDTH)  # uploaded once by case 2, pulled by case 4
        self.unix: Any = None  # a client of the server with a Unix socket (cases 5, 6)
        self.unix_tcp: Any = None  # and one of that server kept on TCP
        self.unix_pid: int | None = None  # that server's process
        self.cpu: dict[str, list[float]] = {}  # row -> [this process's s, server's s, calls]
        self.actors: dict[int, Any] = {}

    def add_ray(self, steps: dict[str, Step], width: int, method: str, *args: Any) -> None:
        """Adds the Ray row, unless Ray is missing or failed (then ``ray_problem`` says why)."""
        if self.ray_problem is not None:
            return
        try:
            if width not in self.actors:
                self.actors[width] = ray_actor(width)
            step = ray_step(self.actors[width], method, *args)
            step()
        except Exception as exc:  # a third-party failure must not hide the other rows
            self.ray_problem = f"failed: {type(exc).__name__}: {exc}"
            return
        steps["ray actor"] = step


def tiny_steps(rig: Rig) -> dict[str, Step]:
    delta = np.full((LANES, 4), 0.5, np.float32)
    steps = {
        "raw jax.pmap": raw_pmap_step(4, delta),
        "local statehost pmap": local_pmap_step(4, delta),
        REMOTE_PULL: remote_pmap_step(rig.client, Affine(4), delta, pull=True),
        REMOTE_KEEP: remote_pmap_step(rig.client, Affine(4), delta, pull=False),
        BARE_ECHO: bare_echo_step(rig.bare),
    }
    rig.add_ray(steps, 4, "step", delta)
    return steps


def resident_steps(rig: Rig) -> dict[str, Step]:
    delta = np.full((LANES, 1), 0.5, np.float32)
    steps = {
        "raw jax.pmap": raw_pmap_step(BIG_WIDTH, delta),
        "local statehost pmap": local_pmap_step(BIG_WIDTH, delta),
        REMOTE_KEEP: remote_pmap_step(rig.client, rig.resident, delta, pull=False),
        BARE_ECHO: bare_echo_step(rig.bare),
    }
    rig.add_ray(steps, BIG_WIDTH, "step", delta)
    return steps


def upload_steps(rig: Rig) -> dict[str, Step]:
    data = np.random.default_rng(0).standard_normal(BIG // 4, np.float32)
    raw, local, remote = jax.jit(total), jit(total), rig.client.jit(total)
    steps = {
        "raw jax.jit": lambda: raw(data),
        "local statehost jit": lambda: local(data),
        REMOTE_JIT: lambda: remote(data),
        BARE_UPLOAD: bare_upload_step(rig.bare, data),
    }
    rig.add_ray(steps, 4, "sum", data)
    return steps


def pull_steps(rig: Rig) -> dict[str, Step]:
    # On CPU, np.asarray of a jax.Array is cached after the first call (and the server's
    # device_get of an unchanged state is too): the local row is a plain 128 MiB host copy.
    on_devices = jax.pmap(lambda w: w)(jnp.ones((LANES, BIG_WIDTH), jnp.float32))
    if rig.client._ledger.needs_upload(rig.resident.weight):  # the resident case did not run
        rig.client.push(rig.resident)
    steps = {
        "local np.array(copy=True)": lambda: np.array(on_devices, copy=True),
        REMOTE_PULL_STATE: lambda: rig.client.pull(rig.resident),
        "bare download": bare_download_step(rig.bare, BIG),
    }
    rig.add_ray(steps, BIG_WIDTH, "weight")
    return steps


def unix_command(port: int, data_dir: Path, log_level: str) -> list[str]:
    """``statehost serve`` as ``statehost_command`` has it, plus a Unix socket next to its
    data dir (where large buffers go by shared memory)."""
    command = statehost_command(port, data_dir, log_level)
    command[command.index("--unix") + 1] = str(data_dir.parent / "run" / "statehost.sock")
    return command


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds used so far by this process, or by process ``pid`` (Linux)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def counting_cpu(rig: Rig, steps: dict[str, Step]) -> dict[str, Step]:
    """``steps``, each adding the CPU time of its calls (this process's, the server's) to
    ``rig.cpu[name]``."""

    def counted(name: str, step: Step) -> Step:
        def run():
            mine, server = cpu_seconds(), cpu_seconds(rig.unix_pid)
            result = jax.block_until_ready(step())
            spent = rig.cpu.setdefault(name, [0.0, 0.0, 0])
            spent[0] += cpu_seconds() - mine
            spent[1] += cpu_seconds(rig.unix_pid) - server
            spent[2] += 1
            return result

        return run

    return {name: counted(name, step) for name, step in steps.items()}


def unix_steps(rig: Rig) -> dict[str, Step]:
    delta = np.full((LANES, 4), 0.5, np.float32)
    return counting_cpu(rig, {
        TCP_TINY: remote_pmap_step(rig.unix_tcp, Affine(4), delta, pull=True),
        UNIX_TINY: remote_pmap_step(rig.unix, Affine(4), delta, pull=True),
    })


def shm_steps(rig: Rig) -> dict[str, Step]:
    data = np.random.default_rng(1).standard_normal(BIG // 4, np.float32)
    copy = np.empty_like(data)
    np.copyto(copy, data)
    states = {"tcp": statehost.ParamState(data), "unix": statehost.ParamState(data)}
    clients = {"tcp": rig.unix_tcp, "unix": rig.unix}

    def push(kind: str) -> Step:
        def step():
            states[kind].value = data  # a write: the next push uploads it
            clients[kind].push(states[kind])

        return step

    def pull(kind: str) -> Step:
        return lambda: clients[kind].pull(states[kind])

    for kind in clients:
        push(kind)()
    return counting_cpu(rig, {
        HOST_COPY: lambda: np.copyto(copy, data),
        TCP_PUSH: push("tcp"),
        SHM_PUSH: push("unix"),
        TCP_PULL: pull("tcp"),
        SHM_PULL: pull("unix"),
    })


def print_cpu(rig: Rig) -> None:
    """CPU time per timed call of the ``unix`` and ``shm`` rows, and the targets' ratios
    on it."""
    if not rig.cpu:
        return
    per = {name: (c / n, s / n) for name, (c, s, n) in rig.cpu.items()}
    print("\nCPU per call of the same-host rows (this process + the server's, in ms):")
    for name, (mine, server) in per.items():
        print(f"  {name:28s} {mine * 1e3:8.2f} + {server * 1e3:8.2f} = "
              f"{(mine + server) * 1e3:8.2f}")
    total = {name: sum(v) for name, v in per.items()}
    if UNIX_TINY in total:
        print(f"  on CPU time: unix tiny {total[UNIX_TINY] / total[TCP_TINY]:.2f}x tcp")
    if SHM_PUSH in total:
        print(f"  on CPU time: shm push {total[HOST_COPY] / total[SHM_PUSH]:.2f}x, shm pull "
              f"{total[HOST_COPY] / total[SHM_PULL]:.2f}x host memcpy")


REMOTE_PULL = "remote client.pmap pull=True"
REMOTE_KEEP = "remote client.pmap pull=False"
REMOTE_JIT = "remote client.jit"
REMOTE_PULL_STATE = "remote client.pull"
BARE_ECHO = f"bare FastAPI+httpx {ECHO} B echo"
BARE_UPLOAD = "bare chunked upload"
TINY_BLOCK = 50  # calls a tiny row makes before the next row takes its turn
TCP_TINY = "tcp client.pmap pull=True"
UNIX_TINY = "unix client.pmap pull=True"
HOST_COPY = "host np.copyto 128 MiB"
TCP_PUSH = "tcp client.push"
SHM_PUSH = "unix+shm client.push"
TCP_PULL = "tcp client.pull"
SHM_PULL = "unix+shm client.pull"


def print_checks(m: dict[tuple[str, str], float]) -> None:
    """The targets, and the measured ratios of the medians (of the cases that ran)."""
    ran = {case for case, _ in m}
    checks = []
    if "tiny" in ran:
        bare_tiny = m["tiny", BARE_ECHO]
        checks += [("tiny", m["tiny", REMOTE_PULL] / bare_tiny, "x", 1.3, False),
                   ("tiny pull=False", m["tiny", REMOTE_KEEP] / bare_tiny, "x", 1.3, False)]
    if "resident" in ran:
        added = m["resident", REMOTE_KEEP] - m["resident", "local statehost pmap"]
        checks.append(("resident", added / m["resident", BARE_ECHO], "x", 1.3, False))
    if "upload" in ran:
        sent = m["upload", REMOTE_JIT] - m["upload", "local statehost jit"]
        checks.append(("upload", m["upload", BARE_UPLOAD] / sent, "x", 0.9, True))
    if "pull" in ran:
        checks.append(("pull", BIG / m["pull", REMOTE_PULL_STATE] / 1e9, " GB/s", 1.0, True))
    if "unix" in ran:
        checks.append(("unix tiny", m["unix", UNIX_TINY] / m["unix", TCP_TINY], "x", 0.8,
                       False))
    if "shm" in ran:
        copy = m["shm", HOST_COPY]
        checks += [("shm push", copy / m["shm", SHM_PUSH], "x", 0.5, True),
                   ("shm pull", copy / m["shm", SHM_PULL], "x", 0.5, True)]
    print("\ntargets (on medians):")
    for case, target in TARGETS.items():
        if case in ran:
            print(f"  {case:9s} {target}")
    print("measured:")
    for name, value, unit, bound, at_least in checks:
        met = value >= bound if at_least else value <= bound
        unit = unit or "x"
        print(
            f"  {name:16s} {value:6.2f}{unit:6s} target {'>=' if at_least else '<='} "
            f"{bound}{unit.strip()}: {'met' if met else 'NOT MET'}"
        )
    if "resident" in ran:
        print(
            f"  resident: remote adds {fmt_us(added)} us to the local step's "
            f"{fmt_us(m['resident', 'local statehost pmap'])} us; the bare round trip takes "
            f"{fmt_us(m['resident', BARE_ECHO])} us"
        )
    if "upload" in ran:
        print(
            f"  upload: remote minus the local step leaves {fmt_us(sent)} us = "
            f"{BIG / sent / 1e6:,.0f} MB/s; the whole remote call is "
            f"{m['upload', BARE_UPLOAD] / m['upload', REMOTE_JIT]:.2f}x the bare upload's MB/s"
        )
    if "shm" in ran:
        rates = {name: BIG / m["shm", name] / 1e9
                 for name in (HOST_COPY, TCP_PUSH, SHM_PUSH, TCP_PULL, SHM_PULL)}
        print("  shm: " + ", ".join(f"{name} {rate:.2f} GB/s" for name, rate in rates.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="timed calls per tiny row")
    parser.add_argument(
        "--big-calls", type=int, default=50, help="timed calls per row of the 128 MiB cases"
    )
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls per tiny row")
    parser.add_argument(
        "--log-level",
        default="info",
        help="uvicorn log level of both servers (statehost serve's default, "
        "info, logs every request)",
    )
    parser.add_argument(
        "--cases", default="tiny,resident,upload,pull,unix,shm",
        help="comma-separated cases to run (default: all)",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a short run: 100 tiny calls, 10 per 128 MiB row, 5 warm-ups")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.big_calls, args.warmup = 100, 10, 5
    wanted = set(args.cases.split(","))

    devices = jax.local_devices(backend=PLATFORM)
    print(
        f"jax {jax.__version__}, {len(devices)} {devices[0].platform} devices, "
        f"{os.cpu_count()} CPUs"
    )
    if len(devices) < LANES:
        raise SystemExit(f"bench_remote: needs {LANES} devices, found {len(devices)}")
    try:
        import httptools

        http_parser = f"httptools {httptools.__version__}"
    except ImportError:
        http_parser = "h11 (httptools not installed)"
    try:
        import uvloop

        event_loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        event_loop = "asyncio (uvloop not installed)"
    print(f"both servers: uvicorn, {http_parser}, {event_loop}, log level {args.log_level}")
    big_block = max(1, args.big_calls // 5)
    cases = [  # case, steps, timed calls, block, warm-up calls, bytes moved per call
        ("tiny", tiny_steps, args.calls, TINY_BLOCK, args.warmup, None),
        ("resident", resident_steps, args.big_calls, big_block, 3, None),
        ("upload", upload_steps, args.big_calls, big_block, 2, BIG),
        ("pull", pull_steps, args.big_calls, big_block, 2, BIG),
        ("unix", unix_steps, args.calls, TINY_BLOCK, args.warmup, None),
        ("shm", shm_steps, args.big_calls, big_block, 3, BIG),
    ]
    cases = [c for c in cases if c[0] in wanted]

    token = secrets.token_urlsafe(16)
    results = Results()
    server_seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_remote_") as tmp_name:
        tmp = Path(tmp_name)
        env = {
            "XDG_CONFIG_HOME": str(tmp / "xdg"),
            "STATEHOST_TOKENS": token,
            "JAX_PLATFORMS": PLATFORM,
        }
        with (
            serving(statehost_command, "statehost-serve", tmp, env, args.log_level) as served,
            serving(bare_command, "bare-app", tmp, env, args.log_level) as bare_served,
            statehost.connect(served.url, token=token, timeout=120) as client,
            httpx.Client(base_url=bare_served.url, timeout=120) as bare,
            httpx.Client(
                base_url=served.url, headers={"authorization": f"Bearer {token}"}, timeout=120
            ) as metrics,
        ):
            rig = Rig(client, bare, ray_problem())
            same_host = contextlib.ExitStack()
            if wanted & {"unix", "shm"}:  # a second server, with a Unix socket
                (tmp / "unix").mkdir()
                unix_served = same_host.enter_context(
                    serving(unix_command, "statehost-unix", tmp / "unix", env, args.log_level))
                rig.unix = same_host.enter_context(
                    statehost.connect(unix_served.url, token=token, timeout=120))
                rig.unix_tcp = same_host.enter_context(
                    statehost.connect(unix_served.url, token=token, timeout=120))
                rig.unix_tcp._http.use_unix(None)  # loopback TCP to the same server
                rig.unix_pid = unix_served.process.pid
                print(f"same-host rows: {rig.unix!r}, shared memory "
                      f"{rig.unix.server_info['shared_memory']['why']}")
            for case, make, calls, block, warmup, nbytes in cases:
                steps = make(rig)
                for step in steps.values():
                    run_calls(step, warmup)
                for name in steps:  # CPU time is counted on the timed calls only
                    rig.cpu.pop(name, None)
                before = server_call_seconds(metrics)
                results.add(case, time_interleaved(steps, calls, block), nbytes)
                after = server_call_seconds(metrics)
                if after[1] > before[1]:
                    server_seconds[case] = (after[0] - before[0]) / (after[1] - before[1])
                del steps  # frees this case's 128 MiB buffers before the next case
            same_host.close()
            if rig.actors:
                import ray

                ray.shutdown()

    print(
        f"\nper-call latency in microseconds; MB/s = 10^6 bytes/s of the {BIG >> 20} MiB "
        f"moved per call; a case's rows take turns in blocks of {TINY_BLOCK} (tiny) or "
        f"{big_block} calls"
    )
    print_table(results.rows)
    if rig.ray_problem is not None:
        print(f"  ray actor: {rig.ray_problem}")
    print_checks(results.medians)
    print_cpu(rig)
    print(
        "\nmean server-side time of POST /v1/call (its handler, from the decoded body to the "
        "response object; from /metrics):"
    )
    for case, seconds in server_seconds.items():
        print(f"  {case:9s} {fmt_us(seconds)} us")


if __name__ == "__main__":
    main()
