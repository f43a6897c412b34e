"""``jit``: the single-device stateful counterpart of ``jax.jit``.

Every state the function reads is passed in, every state it writes comes back
out and is committed after the call; the same probe, cache and write-back
machinery as ``pmap`` / ``vmap`` (``_stateful.StatefulCall``), with no lanes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, overload

import jax

from statehost._state import State
from statehost.transform._axes import argnums
from statehost.transform._probe import ProbeResult, lane_placeholder
from statehost.transform._stateful import LaneSetup, Plan, StatefulCall, state_signature

__all__ = ["StatefulFunction", "jit"]

MISSING: Any = object()
"""Sentinel for "no function given": ``jit(...)`` then returns a decorator."""


class StatefulFunction(StatefulCall):
    """A state-aware ``jax.jit`` of ``fun``; see :func:`jit`."""

    __module__ = "statehost.transform"
    _api = "jit"

    def __init__(
        self,
        fun: Callable[..., Any],
        *,
        static_argnums: Sequence[int] = (),
        donate_argnums: Sequence[int] = (),
    ):
        static, donate, self._donate_shifted = argnums(
            static_argnums, donate_argnums, api="jit", static_name="static_argnums"
        )
        self.static_argnums = static
        self.donate_argnums = donate
        super().__init__(fun, static)

    def __repr__(self) -> str:
        return (f"jit({self.origin_fun!r}, static_argnums={self.static_argnums!r}"
                f"{self._placement_repr()})")

    def _lane_setup(self, dyn: tuple[Any, ...], kwargs: dict[str, Any]) -> LaneSetup:
        abstract = jax.tree_util.tree_map(_abstract, (dyn, kwargs))
        return LaneSetup(None, abstract, [], None)

    def _first_read(self, state: State, path: tuple, value: Any, flag: Any) -> Any:
        return lane_placeholder(value, None, None)

    def _decide(
        self,
        found: ProbeResult,
        paths: dict[State, tuple],
        setup: LaneSetup,
        read: Callable[[State], Any],
    ) -> Plan:
        inputs, outputs = tuple(found.reads), tuple(found.writes)
        signature = tuple(
            (st, state_signature(read(st))) for st in dict.fromkeys([*inputs, *outputs])
        )
        return Plan(
            inputs=inputs, in_axes=(None,) * len(inputs), rngs=(), outputs=outputs,
            out_axes=(None,) * len(outputs), signature=signature, lanes=None, dummy_lanes=False,
        )

    def _transform(self, pure: Callable[..., Any], plan: Plan, n_dyn: int) -> Callable[..., Any]:
        return jax.jit(pure, donate_argnums=self._donate_shifted)


def _abstract(leaf: Any) -> Any:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        weak = getattr(leaf, "weak_type", False)
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, weak_type=weak)
    return leaf


@overload
def jit(fun: Callable[..., Any], /, **options: Any) -> StatefulFunction: ...
@overload
def jit(fun: Any = ..., /, **options: Any) -> Callable[[Callable[..., Any]], StatefulFunction]: ...


def jit(
    fun: Any = MISSING,
    /,
    *,
    static_argnums: int | Sequence[int] = (),
    donate_argnums: int | Sequence[int] = (),
) -> Any:
    """Compiles ``fun`` with ``jax.jit``, passing the states it uses in and out.

    Arguments:
        fun: a function, bound method or ``Module``; omit it to get a decorator.
        static_argnums: positional arguments that are compile-time constants.
        donate_argnums: positional arguments whose buffers XLA may reuse.

    Returns:
        A :class:`StatefulFunction`; a call commits the written states only
        after the whole call succeeded.

    Example:
        >>> import jax.numpy as jnp, statehost
        >>> count = statehost.State(jnp.zeros(()))
        >>> @jit
        ... def tick(n):
        ...     count.value = count.value + n
        ...     return count.value
        >>> _ = tick(1.0); float(tick(2.0))
        3.0
    """
    if fun is MISSING:
        return lambda f: StatefulFunction(
            f, static_argnums=static_argnums, donate_argnums=donate_argnums
        )
    return StatefulFunction(fun, static_argnums=static_argnums, donate_argnums=donate_argnums)
