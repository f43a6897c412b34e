"""Normalising axis specifications: ``state_in_axes`` / ``state_out_axes`` and ``in_axes``.

Specs are checked and normalised once, when a transform is built, into an
ordered tuple of ``(axis, predicate)`` pairs. Only what depends on the call's
arguments (sizes, ranks) is checked at call time.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax

from statehost.util._filter import to_predicate

__all__ = [
    "AxisSpec",
    "argnums",
    "broadcast_prefix",
    "match_axis",
    "normalize_state_axes",
]

AxisSpec = tuple[tuple[int | None, Any], ...]

_NO_MATCH = object()

_MSG_BAD_STATE_AXES = (
    "{api}({arg}=...): {problem}. Write it as {{axis: filter}}, e.g. "
    "{arg}={{0: OfType(statehost.ParamState)}}, or pass a bare filter, which means {{0: filter}}."
)


def normalize_state_axes(spec: Any, *, api: str, arg: str) -> AxisSpec:
    """``{axis: filter}`` or a bare filter (meaning ``{0: filter}``) -> ordered pairs."""
    if spec is None:
        return ()
    items = spec.items() if isinstance(spec, dict) else [(0, spec)]
    pairs = []
    for axis, flt in items:
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            problem = f"the key {axis!r} is not an axis (an int or None)"
            raise TypeError(_MSG_BAD_STATE_AXES.format(api=api, arg=arg, problem=problem))
        try:
            pred = to_predicate(flt)
        except TypeError as exc:
            problem = f"the filter for axis {axis!r} is invalid: {exc}"
            raise TypeError(_MSG_BAD_STATE_AXES.format(api=api, arg=arg, problem=problem)) from exc
        pairs.append((axis, pred))
    return tuple(pairs)


def match_axis(spec: AxisSpec, path: tuple[Hashable, ...], state: Any) -> Any:
    """The axis of the first pair whose filter selects ``state``, or ``_NO_MATCH``."""
    for axis, pred in spec:
        if pred(path, state):
            return axis
    return _NO_MATCH


def is_match(axis: Any) -> bool:
    return axis is not _NO_MATCH


def broadcast_prefix(prefix: Any, tree: Any, what: str) -> list[Any]:
    """The value of ``prefix`` (a pytree prefix of ``tree``) for every leaf of ``tree``."""
    result: list[Any] = []

    def add(axis: Any, sub: Any) -> None:
        result.extend([axis] * len(jax.tree_util.tree_leaves(sub)))

    try:
        jax.tree_util.tree_map(add, prefix, tree, is_leaf=lambda x: x is None)
    except ValueError as exc:
        raise ValueError(
            f"{what}: the axes {prefix!r} do not match the structure of the arguments "
            f"{jax.tree_util.tree_structure(tree)}. Give one axis per positional argument "
            f"(a tuple as long as the arguments), or a single int/None for all of them."
        ) from exc
    return result


def per_arg_axes(in_axes: Any, n_args: int, api: str) -> tuple[Any, ...]:
    """``in_axes`` as one entry per positional argument."""
    if isinstance(in_axes, list):
        in_axes = tuple(in_axes)
    if not isinstance(in_axes, tuple):
        return (in_axes,) * n_args
    if len(in_axes) != n_args:
        raise ValueError(
            f"{api}: in_axes={in_axes!r} has {len(in_axes)} entries but the function was "
            f"called with {n_args} positional arguments. Give one entry per positional "
            f"argument, or a single int/None for all of them."
        )
    return in_axes


def check_axes_value(value: Any, *, api: str, arg: str) -> None:
    """Rejects anything but ints, None and (nested) tuples/lists/dicts of them."""
    bad = [
        leaf
        for leaf in jax.tree_util.tree_leaves(value, is_leaf=lambda x: x is None)
        if leaf is not None and (not isinstance(leaf, int) or isinstance(leaf, bool))
    ]
    if bad:
        raise TypeError(
            f"{api}({arg}={value!r}): axes must be ints or None (in a tuple per argument), "
            f"got {bad[0]!r}."
        )


def argnums(
    static: int | Sequence[int], donate: int | Sequence[int], *, api: str, static_name: str
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Normalises static and donated argument numbers.

    Returns ``(static, donate, shifted)`` where ``shifted`` are the donated
    positions once static arguments are removed (what the compiled function sees).
    """
    static_t = (static,) if isinstance(static, int) else tuple(static)
    donate_t = (donate,) if isinstance(donate, int) else tuple(donate)
    clash = set(static_t) & set(donate_t)
    if clash:
        raise ValueError(
            f"{api}: argument {sorted(clash)[0]} is both in {static_name} and donate_argnums; "
            f"a static argument has no buffer to donate. Remove it from one of the two."
        )
    shifted = tuple(i - sum(s < i for s in static_t) for i in donate_t)
    return static_t, donate_t, shifted
