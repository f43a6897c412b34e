"""Client-side cost of turning a call's reply into its outputs, per call.

A remote call's outputs arrive as numpy host copies in the reply's ``results``
section. Two rows per case, side by side:

- ``numpy``: ``reply.results.load()``, what the client returned before outputs were
  ``jax.Array``s;
- ``jax.Array``: ``statehost.client._outputs.local_outputs(reply)``, what it returns
  now (the same load, then one ``jnp.asarray`` per leaf, and the weak type where the
  server's output had one).

The difference is what each remote call pays for outputs that print, compare and
promote like the local call's. Cases: the bench's ``tiny`` output (8x4 float32), the
seed's ``add_with_scale`` output (8 weakly typed float32), a dict of three small
outputs, and one 4 MiB output. The reply is decoded from its bytes each time, as the
client does. Nothing here asserts a timing (STYLE rule 40).

Run: ``python bench/bench_outputs.py [--calls N]``.
"""

import jax

jax.config.update("jax_platforms", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax.numpy as jnp  # noqa: E402

from statehost.client._outputs import local_outputs  # noqa: E402
from statehost.wire import CallReply, decode, pack  # noqa: E402


def reply_bytes(out: Any) -> bytes:
    """The encoded reply of a call that returned ``out``, as the server builds it."""
    weak = tuple(bool(x.weak_type) for x in jax.tree_util.tree_leaves(out))
    results = pack(jax.device_get(out), refs=False, code=False)
    return CallReply(call_id="c", weak_types=weak, results=results).to_frame().to_bytes()


def cases() -> dict[str, Any]:
    with jax.numpy_dtype_promotion("standard"):
        weak = jnp.arange(8) + 0.5
    return {
        "tiny 8x4 float32": jnp.ones((8, 4), jnp.float32),
        "seed cell 5, 8 weak float32": weak,
        "dict of 3 small outputs": {"a": jnp.ones(8), "b": jnp.zeros((2, 2), jnp.int32),
                                    "c": jnp.asarray(1.0)},
        "4 MiB float32": jnp.ones((1024, 1024), jnp.float32),
    }


def time_us(fun: Callable[[], Any], calls: int) -> float:
    """Median microseconds of ``fun()``, each call blocked on its result."""
    for _ in range(20):
        jax.block_until_ready(fun())
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fun())
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per row")
    args = parser.parse_args()

    rows = [["case", "numpy us", "jax.Array us", "added us"]]
    for name, out in cases().items():
        data = reply_bytes(out)
        before = time_us(lambda data=data: CallReply.from_frame(decode(data)).results.load(),
                         args.calls)
        after = time_us(lambda data=data: local_outputs(CallReply.from_frame(decode(data))),
                        args.calls)
        rows.append([name, f"{before:,.1f}", f"{after:,.1f}", f"{after - before:,.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"jax {jax.__version__}, client-side decode of one call's reply, median of "
          f"{args.calls} calls")
    for i, row in enumerate(rows):
        print(" | ".join([row[0].ljust(widths[0])] +
                         [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
