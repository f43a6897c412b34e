"""The probe: trace a function once to learn which states it reads and writes.

The probe runs the user's function under ``jax.make_jaxpr`` with a
:class:`~statehost._state.StateTrace` active. The first read of each state
returns a placeholder of the shape the function will see (per lane when the
state is mapped), so no state value is touched. With a mapped axis the
probe also works out, from the jaxpr, which written values vary across lanes:
per-lane inputs and ``axis_index`` make a value vary, ``psum``-like
collectives over the mapped axis make it uniform again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from statehost._state import State, StateTrace

__all__ = ["ProbeResult", "drop_axis", "lane_placeholder", "leaf_signature", "probe"]

# Collectives whose result is the same on every lane of the axes they reduce over.
_UNIFORM_COLLECTIVES = frozenset(
    {"psum", "pmax", "pmin", "pmean", "all_gather", "psum_invariant", "all_gather_invariant"}
)
# Parameters that hold a sub-jaxpr with the same inputs and outputs as the equation.
_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


@dataclass
class ProbeResult:
    """What one probe learned.

    Attributes:
        reads: states whose value the function read before writing it, in order.
        writes: states the function wrote, in order of first write.
        varying: for each written state, whether its new value differs across lanes.
    """

    reads: list[State]
    writes: list[State]
    varying: dict[State, bool]


def _zeros(aval: Any) -> jax.Array:
    if jax.dtypes.issubdtype(aval.dtype, jax.dtypes.prng_key):
        data_shape = jax.random.key_data(jax.random.key(0, impl=aval.dtype._impl)).shape
        data = jnp.zeros(aval.shape + data_shape, jnp.uint32)
        return jax.random.wrap_key_data(data, impl=aval.dtype._impl)
    return jnp.zeros(aval.shape, aval.dtype)


def drop_axis(shape: tuple[int, ...], axis: int | None) -> tuple[int, ...]:
    """``shape`` without ``axis`` (negative axes count from the end); ``None`` keeps it."""
    if axis is None:
        return tuple(shape)
    ax = axis % len(shape)
    return tuple(shape[:ax]) + tuple(shape[ax + 1 :])


def lane_placeholder(value: Any, axis: int | None, flag: Any) -> Any:
    """Zeros shaped like one lane of ``value`` (``axis`` removed, when not ``None``).

    With ``flag`` (a traced per-lane boolean) the placeholder depends on it, so
    the variation analysis sees it as varying across lanes.
    """

    def one(leaf: Any) -> Any:
        aval = jax.typeof(leaf)
        z = _zeros(aval.update(shape=drop_axis(aval.shape, axis)))
        return jax.lax.select(flag, z, z) if flag is not None else z

    return jax.tree_util.tree_map(one, value)


def probe(
    call: Callable[[Any], Any],
    lane_args: Any,
    args_varying: list[bool],
    first_read: Callable[[State, Any], Any],
    axis_env: list[tuple[Any, int]] | None,
    on_trace: Callable[[], None],
) -> ProbeResult:
    """Traces ``call(lane_args)`` once and reports the states it touched.

    Arguments:
        call: runs the user's function on one lane's arguments.
        lane_args: one lane's arguments as ``jax.ShapeDtypeStruct`` leaves.
        args_varying: for each leaf of ``lane_args``, whether it differs across lanes.
        first_read: ``(state, flag) -> placeholder`` for a state's first read;
            ``flag`` is a traced per-lane boolean to make a placeholder vary.
        axis_env: ``[(axis_name, size)]`` so collectives can be traced, or ``None``.
        on_trace: called once each time the user's function body runs.
    """
    seen: dict[str, Any] = {}

    def body(args: Any, flag: Any) -> Any:
        on_trace()
        trace = StateTrace(on_first_read=lambda st: first_read(st, flag))
        with trace:
            out = call(args)
        written = list(trace.write_order)
        new_values = [trace.values[s] for s in written]
        sizes = [len(jax.tree_util.tree_leaves(v)) for v in new_values]
        seen.update(reads=list(trace.read_order), writes=written, sizes=sizes, out=out)
        return jax.tree_util.tree_leaves(out), new_values

    flag = jax.ShapeDtypeStruct((), bool)
    closed = jax.make_jaxpr(body, axis_env=axis_env or [])(lane_args, flag)
    writes: list[State] = seen["writes"]
    out_tree = jax.tree_util.tree_structure(seen["out"])
    varying: dict[State, bool] = {}
    if axis_env:
        flags = _varying_outputs(closed.jaxpr, [*args_varying, True], axis_env[0][0])
        cursor = out_tree.num_leaves
        for state, size in zip(writes, seen["sizes"], strict=True):
            varying[state] = any(flags[cursor : cursor + size])
            cursor += size
    return ProbeResult(seen["reads"], writes, varying)


def _axis_names(params: dict[str, Any]) -> tuple[Any, ...]:
    names = params.get("axes", params.get("axis_name", ()))
    return names if isinstance(names, tuple | list) else (names,)


def _varying_outputs(jaxpr: Any, in_varying: list[bool], axis_name: Any) -> list[bool]:
    """Forward data-flow: which outputs of ``jaxpr`` differ across lanes of ``axis_name``."""
    env: dict[Any, bool] = dict(zip(jaxpr.invars, in_varying, strict=True))

    def get(v: Any) -> bool:
        return False if isinstance(v, jex.Literal) else env.get(v, False)

    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name == "axis_index" and axis_name in _axis_names(eqn.params):
            outs = [True] * len(eqn.outvars)
        elif name in _UNIFORM_COLLECTIVES and axis_name in _axis_names(eqn.params):
            outs = [False] * len(eqn.outvars)
        else:
            outs = _call_outputs(eqn, ins, axis_name)
        for v, flag in zip(eqn.outvars, outs, strict=True):
            env[v] = flag
    return [get(v) for v in jaxpr.outvars]


def _call_outputs(eqn: Any, ins: list[bool], axis_name: Any) -> list[bool]:
    for key in _CALL_PARAMS:
        sub = eqn.params.get(key)
        sub = getattr(sub, "jaxpr", sub)
        if (
            isinstance(sub, jex.Jaxpr)
            and len(sub.invars) == len(ins)
            and len(sub.outvars) == len(eqn.outvars)
        ):
            return _varying_outputs(sub, ins, axis_name)
    return [any(ins)] * len(eqn.outvars)


def leaf_signature(x: Any) -> Any:
    """A hashable description of one argument leaf: shape, dtype, weak type."""
    shape = getattr(x, "shape", None)
    if shape is not None and hasattr(x, "dtype"):
        return (shape, x.dtype, getattr(x, "weak_type", False))
    if isinstance(x, bool | int | float | complex):
        return type(x)
    return (type(x), np.shape(x))
