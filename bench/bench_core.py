"""Steady-state per-call latency of statehost's transforms, side by side with the baselines.

One table, two state sizes (tiny: 8x4 float32; 16MiB: 8x524288 float32), one row each for:

1. raw ``jax.pmap`` of the pure ``f(w, delta) -> (w + delta, w + delta)``, feeding the
   new ``w`` back in (the weights never leave the devices);
2. ``statehost.transform.pmap`` of the README's ``Affine`` module (``ParamState`` mapped
   on axis 0 in and out, ``axis_name='devices'``);
3. ``statehost.transform.jit(statehost.transform.vmap(...))`` of the same module (one
   device runs all 8 lanes, so it is a different computation from rows 1-2);
4. brainstate's ``brainstate.transform.pmap2`` of the same module written against
   brainstate (fewer calls: it is much slower; the row says ``n``).

Every timed call blocks on its output and on the new state. The deltas are placed
before timing (sharded over the 8 devices for the pmaps, on one device for jit+vmap), so
no row moves data from the host in the loop. Rows 1-3 take turns in blocks of calls, so
that they see the same machine load and their ratio means something on a busy host.
Below the table: the ratio statehost pmap / raw pmap, and each statehost row's
``cache_info()`` before and after the timed loop (no new miss or trace: no retrace).

Run: ``make bench`` or ``python bench/bench_core.py [--calls N] [--brainstate-calls N]``.
Nothing here asserts a timing (STYLE rule 40).
"""

import jax

# pmap needs 8 devices; on a CPU-only host this must be set before any backend starts.
jax.config.update("jax_num_cpu_devices", 8)

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import statehost  # noqa: E402
from statehost.transform import jit, pmap, vmap  # noqa: E402
from statehost.util.filter import OfType  # noqa: E402

LANES = 8
SIZES = {"tiny": 4, "16MiB": 524288}  # label -> width of the (LANES, width) float32 state
TARGETS = {"tiny": 1.3, "16MiB": 1.05}  # wanted bound on statehost pmap / raw jax.pmap
BLOCK = 50  # calls a row makes before the next row takes its turn

Step = Callable[[], Any]
"""One timed call: runs the transform once and returns what to block on."""


class Affine(statehost.nn.Module):
    """The seed notebook's module: adds ``delta`` to its weight and returns it."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = statehost.ParamState(jnp.ones((LANES, width), jnp.float32))

    def __call__(self, delta):
        self.weight.value = self.weight.value + delta
        return self.weight.value


# -- timing ----------------------------------------------------------------------


def run_calls(step: Step, calls: int) -> list[float]:
    """Seconds taken by each of ``calls`` calls, each blocked on its result."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(step())
        times.append(time.perf_counter() - start)
    return times


def time_interleaved(steps: dict[str, Step], calls: int) -> dict[str, list[float]]:
    """``calls`` timed calls of every step, the steps taking turns in blocks of ``BLOCK``."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for done in range(0, calls, BLOCK):
        for name, step in steps.items():
            times[name] += run_calls(step, min(BLOCK, calls - done))
    return times


def stats(times: list[float]) -> list[str]:
    """The median and p90 of ``times``, formatted in microseconds."""
    return [f"{np.percentile(times, q) * 1e6:,.1f}" for q in (50, 90)]


def sharded(x: jax.Array) -> jax.Array:
    """``x`` split over the devices along axis 0, exactly as a pmap output is."""
    return jax.pmap(lambda v: v)(x)


# -- one step function per row ------------------------------------------------------


def raw_pmap_step(width: int) -> Step:
    fun = jax.pmap(lambda w, delta: (w + delta, w + delta), axis_name="devices")
    delta = sharded(jnp.full((LANES, width), 0.5, jnp.float32))
    box = [sharded(jnp.ones((LANES, width), jnp.float32))]

    def step():
        box[0], out = fun(box[0], delta)
        return box[0], out

    return step


def statehost_pmap_step(width: int) -> tuple[Step, Any]:
    model = Affine(width)
    fun = pmap(
        model,
        axis_name="devices",
        state_in_axes={0: OfType(statehost.ParamState)},
        state_out_axes={0: OfType(statehost.ParamState)},
    )
    delta = sharded(jnp.full((LANES, width), 0.5, jnp.float32))
    return (lambda: (fun(delta), model.weight.value)), fun


def statehost_jit_vmap_step(width: int) -> tuple[Step, Any]:
    model = Affine(width)
    inner = vmap(
        model,
        state_in_axes={0: OfType(statehost.ParamState)},
        state_out_axes={0: OfType(statehost.ParamState)},
    )
    fun = jit(inner)
    delta = jnp.full((LANES, width), 0.5, jnp.float32)
    return (lambda: (fun(delta), model.weight.value)), fun


def brainstate_pmap2_step(width: int) -> Step:
    import brainstate
    from brainstate.util.filter import OfType as BsOfType

    class BsAffine(brainstate.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = brainstate.ParamState(jnp.ones((LANES, width), jnp.float32))

        def __call__(self, delta):
            self.weight.value = self.weight.value + delta
            return self.weight.value

    model = BsAffine()
    fun = brainstate.transform.pmap2(
        model,
        axis_name="devices",
        state_in_axes={0: BsOfType(brainstate.ParamState)},
        state_out_axes={0: BsOfType(brainstate.ParamState)},
    )
    delta = sharded(jnp.full((LANES, width), 0.5, jnp.float32))
    return lambda: (fun(delta), model.weight.value)


def brainstate_problem() -> str | None:
    """Why brainstate's row cannot run, or ``None`` when it can."""
    try:
        import brainstate
    except Exception as exc:  # an ImportError, or a jax incompatibility at import
        return f"brainstate not importable ({type(exc).__name__}: {exc}); run: make bench"
    if not hasattr(brainstate.transform, "pmap2"):
        return f"brainstate {brainstate.__version__} has no transform.pmap2"
    return None


# -- the table ---------------------------------------------------------------------


def print_table(rows: list[tuple[str, str, list[str]]]) -> None:
    header = ["row", "n"]
    for size in SIZES:
        header += [f"{size} median", f"{size} p90"]
    table = [header] + [[name, n, *cells] for name, n, cells in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, row in enumerate(table):
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print(" | ".join(cells))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def cache_report(name: str, size: str, before: Any, fun: Any) -> str:
    """``fun.cache_info()`` before and after the timed loop, and whether it retraced."""
    after = fun.cache_info()
    retraced = (after.misses, after.traces) != (before.misses, before.traces)
    verdict = "RETRACED" if retraced else f"no retrace ({after.hits - before.hits} new hits)"
    report = f"  {name} @ {size}:\n    before {before}\n    after  {after}  -> {verdict}"
    if isinstance(fun.origin_fun, statehost.transform.StatefulMapping):
        report += f"\n    inner vmap {fun.origin_fun.cache_info()} (runs only while jit traces)"
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per cell")
    parser.add_argument("--brainstate-calls", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()

    devices = jax.local_devices()
    print(f"jax {jax.__version__}, {len(devices)} {devices[0].platform} devices")
    if len(devices) < LANES:
        raise SystemExit(f"bench_core: needs {LANES} devices, found {len(devices)}")
    problem = brainstate_problem()
    bs_name = "brainstate transform.pmap2"
    if problem is None:
        import brainstate

        bs_name = f"brainstate {brainstate.__version__} transform.pmap2"

    makers = {"statehost pmap": statehost_pmap_step, "statehost jit(vmap)": statehost_jit_vmap_step}
    cells: dict[str, list[str]] = {name: [] for name in ["raw jax.pmap", *makers, bs_name]}
    medians: dict[tuple[str, str], float] = {}
    caches: list[str] = []
    for size, width in SIZES.items():
        steps, funs = {"raw jax.pmap": raw_pmap_step(width)}, {}
        for name, make in makers.items():
            steps[name], funs[name] = make(width)
        for step in steps.values():
            run_calls(step, args.warmup)
        before = {name: fun.cache_info() for name, fun in funs.items()}
        for name, times in time_interleaved(steps, args.calls).items():
            cells[name] += stats(times)
            medians[name, size] = float(np.median(times))
        caches += [cache_report(name, size, before[name], fun) for name, fun in funs.items()]

        bs_cells = ["n/a", "n/a"]
        if problem is None:
            try:
                step = brainstate_pmap2_step(width)
                run_calls(step, 5)
                bs_cells = stats(run_calls(step, args.brainstate_calls))
            except Exception as exc:  # a third-party failure must not hide the other rows
                problem = f"failed at {size}: {type(exc).__name__}: {exc}"
        cells[bs_name] += bs_cells

    shapes = ", ".join(f"{size} = {LANES}x{width} float32" for size, width in SIZES.items())
    print(f"\nper-call latency in microseconds ({shapes}); each call blocks on its result")
    calls = {name: str(args.calls) for name in cells}
    calls[bs_name] = "-" if set(cells[bs_name]) == {"n/a"} else str(args.brainstate_calls)
    print_table([(name, calls[name], row) for name, row in cells.items()])
    if problem is not None:
        print(f"  {bs_name}: {problem}")
    print("\nstatehost pmap / raw jax.pmap (median):")
    for size, target in TARGETS.items():
        ratio = medians["statehost pmap", size] / medians["raw jax.pmap", size]
        print(f"  {size:6s} {ratio:5.2f}x  (target <= {target}x)")
    print("\ncache_info() of the statehost rows before and after the timed loop (after warm-up):")
    print("\n".join(caches))


if __name__ == "__main__":
    main()
