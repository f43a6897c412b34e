"""``StatefulMapping``, ``pmap`` and ``vmap``: state-aware mapping over lanes.

A lane is one slice of the mapped axis: one device under ``pmap``, one batch
element under ``vmap``. States enter each lane either mapped (a slice per lane,
chosen by ``state_in_axes``) or broadcast (the same value everywhere); written
states leave stacked on an axis (``state_out_axes``) or, when their new value
is the same on every lane, once and unbatched. Random states get one key per
lane and their stream advances once per call.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import numpy as np

from statehost._errors import BatchAxisError
from statehost._state import State
from statehost.random._rand import RandomState
from statehost.transform._axes import (
    broadcast_prefix,
    check_axes_value,
    is_match,
    match_axis,
    normalize_state_axes,
    per_arg_axes,
)
from statehost.transform._probe import ProbeResult, drop_axis, lane_placeholder
from statehost.transform._stateful import LaneSetup, Plan, StatefulCall, state_signature

__all__ = ["StatefulMapping"]

Mode = Literal["auto", "raise", "warn", "ignore"]
_MODES = ("auto", "raise", "warn", "ignore")
# Axis name bound while probing when the user gave none (collectives need a name).
_PROBE_AXIS = "__statehost_lanes__"
# States already warned about being stacked under 'auto' (one warning per state).
_AUTO_STACK_WARNED: weakref.WeakSet[State] = weakref.WeakSet()

_MSG_BAD_MODE = (
    "{api}(unexpected_out_state_mapping={mode!r}): must be one of 'auto', 'raise', 'warn', "
    "'ignore'."
)
_MSG_UNDECLARED = (
    "{api}: {state} at path {path} was written with a value that differs across the {lanes} "
    "lanes, but no state_out_axes entry covers it (unexpected_out_state_mapping='raise'). "
    "Fix it in one of these ways:\n"
    "  1. declare where it goes: state_out_axes={{0: <filter matching it>}} (and "
    "state_in_axes too if each lane should read its own slice);\n"
    "  2. pass unexpected_out_state_mapping='auto' or 'warn' to stack it on axis 0."
)
_MSG_AXIS_CONFLICT = (
    "{api}: {state} at path {path} is mapped in on axis {in_axis} (state_in_axes) but "
    "state_out_axes sends it out on axis {out_axis}. A state must leave on the axis it came "
    "in on; make the two specs agree."
)
_MSG_UNBATCHED_VARYING = (
    "{api}: {state} at path {path} is declared unbatched (state_out_axes axis None) but was "
    "written with a value that differs across the {lanes} lanes. Declare an axis for it "
    "instead, e.g. state_out_axes={{0: ...}}."
)
_MSG_STATE_AXIS_RANGE = (
    "{api}: state_in_axes maps {state} at path {path} on axis {axis}, but its value{leaf} has "
    "shape {shape}. Use an axis from {low} to {high}, or a filter that does not select this "
    "state."
)
_MSG_STATE_AXIS_SCALAR = (
    "{api}: state_in_axes maps {state} at path {path} on axis {axis}, but its value{leaf} is a "
    "scalar (shape ()), which has no axis to map over. A scalar state cannot be mapped: "
    "use a filter that does not select it (it is then shared by every lane), or give it a "
    "leading axis of the mapped size."
)
_MSG_LANE_MISMATCH = (
    "{api}: inconsistent sizes along the mapped axes: {what} has size {size} but {first} "
    "has size {lanes}. Every mapped argument and every state selected by state_in_axes must "
    "have the same size on its mapped axis."
)
_MSG_NO_LANES = (
    "{api}: cannot tell how many lanes to map over: no argument is mapped by in_axes={in_axes!r} "
    "and no state was selected by state_in_axes. Pass axis_size=N."
)
_MSG_AUTO_STACK = (
    "{api}: {state} at path {path} is read and written with a value that differs across the "
    "{lanes} lanes, but it is not covered by state_in_axes/state_out_axes and its leading size "
    "({size}) is not the lane count; it is stacked on a new axis 0 (shape {shape} -> "
    "({lanes}, ...)). From the next call on, each lane reads its own slice. To make this "
    "explicit, declare it: state_in_axes={{0: ...}}, state_out_axes={{0: ...}}."
)
_MSG_AUTO_WARN = (
    "{api}: {state} at path {path} was written with a value that differs across lanes but is "
    "not covered by state_out_axes; it is stacked on axis 0 "
    "(unexpected_out_state_mapping='warn')."
)


def _fmt_path(path: tuple) -> str:
    return "/".join(str(p) for p in path) if path else "<not in the module>"


class StatefulMapping(StatefulCall):
    """A state-aware mapping of ``fun`` over lanes (``jax.vmap`` or ``jax.pmap``).

    Arguments:
        fun: the function, bound method or ``Module`` to map.
        in_axes, out_axes: as in ``jax.vmap`` / ``jax.pmap``, for the arguments
            and outputs of ``fun``.
        state_in_axes: ``{axis: filter}`` (or a bare filter, meaning ``{0: filter}``):
            selected states are sliced per lane along ``axis`` and written back on it.
        state_out_axes: ``{axis: filter}``: where written states are stacked.
        unexpected_out_state_mapping: what to do with a written state that no
            ``state_out_axes`` entry covers and whose value differs across lanes:
            ``'raise'``, ``'warn'`` (stack on axis 0 with a warning), ``'ignore'``
            (stack on axis 0), ``'auto'`` (see the module docs).
        axis_name, axis_size: as in ``jax.vmap`` / ``jax.pmap``.
        mapping_fn: called as ``mapping_fn(f, in_axes=..., out_axes=...,
            axis_name=..., axis_size=...)``; ``jax.vmap`` by default.
        static_argnums: positional arguments that are compile-time constants.

    Returns:
        A callable; calling it runs ``fun`` once per lane and commits the states.

    Example:
        >>> import jax.numpy as jnp, statehost
        >>> from statehost.util.filter import OfType
        >>> w = statehost.ParamState(jnp.zeros((3, 2)))
        >>> def step(x):
        ...     w.value = w.value + x
        ...     return w.value.sum()
        >>> f = StatefulMapping(step, state_in_axes={0: OfType(statehost.ParamState)},
        ...                     state_out_axes={0: OfType(statehost.ParamState)})
        >>> f(jnp.ones((3, 2))).tolist()
        [2.0, 2.0, 2.0]
    """

    __module__ = "statehost.transform"
    _api = "StatefulMapping"

    def __init__(
        self,
        fun: Callable[..., Any],
        in_axes: Any = 0,
        out_axes: Any = 0,
        state_in_axes: Any = None,
        state_out_axes: Any = None,
        unexpected_out_state_mapping: Mode = "auto",
        axis_name: Any = None,
        axis_size: int | None = None,
        mapping_fn: Callable[..., Any] = jax.vmap,
        *,
        static_argnums: Sequence[int] = (),
        name: str | None = None,
    ):
        api = name or self._api
        self._api = api
        if unexpected_out_state_mapping not in _MODES:
            raise ValueError(_MSG_BAD_MODE.format(api=api, mode=unexpected_out_state_mapping))
        check_axes_value(in_axes, api=api, arg="in_axes")
        check_axes_value(out_axes, api=api, arg="out_axes")
        if axis_size is not None and (not isinstance(axis_size, int) or axis_size < 1):
            raise ValueError(f"{api}(axis_size={axis_size!r}): must be a positive int or None.")
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.axis_name = axis_name
        self.axis_size = axis_size
        self.mapping_fn = mapping_fn
        self.unexpected_out_state_mapping = unexpected_out_state_mapping
        self._state_in = normalize_state_axes(state_in_axes, api=api, arg="state_in_axes")
        self._state_out = normalize_state_axes(state_out_axes, api=api, arg="state_out_axes")
        super().__init__(fun, tuple(static_argnums))

    @property
    def state_in_axes(self) -> dict[int | None, Any]:
        """The normalised ``state_in_axes``: ``{axis: filter}``."""
        return dict(self._state_in)

    @property
    def state_out_axes(self) -> dict[int | None, Any]:
        """The normalised ``state_out_axes``: ``{axis: filter}``."""
        return dict(self._state_out)

    def __repr__(self) -> str:
        return (
            f"StatefulMapping({self.origin_fun!r}, in_axes={self.in_axes!r}, "
            f"out_axes={self.out_axes!r}, state_in_axes={self.state_in_axes!r}, "
            f"state_out_axes={self.state_out_axes!r}, axis_name={self.axis_name!r}, "
            f"mapping_fn={self.mapping_fn!r}{self._placement_repr()})"
        )

    # -- lanes -------------------------------------------------------------------
    def _dyn_in_axes(self, n_dyn: int) -> tuple[Any, ...]:
        axes = self.in_axes
        if isinstance(axes, list):
            axes = tuple(axes)
        if isinstance(axes, tuple) and self._static_argnums and len(axes) == n_dyn + len(
            self._static_argnums
        ):
            axes = tuple(a for i, a in enumerate(axes) if i not in self._static_argnums)
        return per_arg_axes(axes, n_dyn, self._api)

    def _lane_setup(self, dyn: tuple[Any, ...], kwargs: dict[str, Any]) -> LaneSetup:
        axes = self._dyn_in_axes(len(dyn))
        lanes, first = self.axis_size, "axis_size"
        lane_dyn, varying = [], []
        for index, (arg, axis) in enumerate(zip(dyn, axes, strict=True)):
            leaf_axes = broadcast_prefix(axis, arg, f"{self._api}: in_axes for argument {index}")
            leaves, treedef = jax.tree_util.tree_flatten(arg)
            lane_leaves = []
            for leaf, ax in zip(leaves, leaf_axes, strict=True):
                lane_leaf, size = _lane_leaf(leaf, ax, f"argument {index}", self._api)
                lane_leaves.append(lane_leaf)
                varying.append(ax is not None)
                if size is not None:
                    lanes, first = self._agree(lanes, first, size, f"argument {index}")
            lane_dyn.append(jax.tree_util.tree_unflatten(treedef, lane_leaves))
        lane_kwargs = {}
        for key, arg in kwargs.items():
            leaves, treedef = jax.tree_util.tree_flatten(arg)
            lane_leaves = []
            for leaf in leaves:
                lane_leaf, size = _lane_leaf(leaf, 0, f"keyword argument {key!r}", self._api)
                lane_leaves.append(lane_leaf)
                varying.append(True)
                lanes, first = self._agree(lanes, first, size, f"keyword argument {key!r}")
            lane_kwargs[key] = jax.tree_util.tree_unflatten(treedef, lane_leaves)
        if lanes is None:
            lanes = self._default_lanes()
        axis_env = [(self.axis_name or _PROBE_AXIS, lanes or 1)]
        return LaneSetup(lanes, (tuple(lane_dyn), lane_kwargs), varying, axis_env, first)

    def _default_lanes(self) -> int | None:
        devices = getattr(self.mapping_fn, "devices", None)
        return len(devices) if devices else None

    def _agree(self, lanes: int | None, first: str, size: int, what: str) -> tuple[int, str]:
        if lanes is None:
            return size, what
        if size != lanes:
            raise ValueError(
                _MSG_LANE_MISMATCH.format(
                    api=self._api, what=what, size=size, first=first, lanes=lanes
                )
            )
        return lanes, first

    # -- probe view --------------------------------------------------------------
    def _first_read(self, state: State, path: tuple, value: Any, flag: Any) -> Any:
        if isinstance(state, RandomState):
            return lane_placeholder(value, None, flag)
        axis = match_axis(self._state_in, path, state)
        if is_match(axis) and axis is not None:
            self._check_state_axis(state, path, value, axis)
            return lane_placeholder(value, axis, flag)
        return lane_placeholder(value, None, None)

    def _check_state_axis(self, state: State, path: tuple, value: Any, axis: int) -> int:
        """The size of ``axis`` in every leaf of ``value``; raises if a leaf lacks the axis."""
        size = 0
        leaves = jax.tree_util.tree_leaves_with_path(value)
        for key, leaf in leaves:
            shape = tuple(np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape)
            if -len(shape) <= axis < len(shape):
                size = size or shape[axis]
                continue
            fields = dict(api=self._api, state=state._label(), path=_fmt_path(path), axis=axis,
                          shape=shape, low=-len(shape), high=len(shape) - 1,
                          leaf=f" leaf {jax.tree_util.keystr(key)}" if len(leaves) > 1 else "")
            template = _MSG_STATE_AXIS_SCALAR if not shape else _MSG_STATE_AXIS_RANGE
            raise BatchAxisError(template.format(**fields))
        return size

    def _run_probe(self, call, setup, paths, read, per_lane=frozenset(), seen=None):
        """Probes with undeclared states broadcast; under 'auto', retries once with the
        lane-sized ones per lane if that fails (a per-lane buffer often only type-checks
        per lane), and remembers buffers already found to be per lane."""
        lanes = setup.lanes

        def lane_sized(st: State) -> bool:
            leaves = jax.tree_util.tree_leaves(read(st))
            return bool(leaves) and all(np.ndim(x) and np.shape(x)[0] == lanes for x in leaves)

        known = frozenset(st for st in self._per_lane if lanes is not None and lane_sized(st))
        seen_now: list[State] = []
        try:
            return super()._run_probe(call, setup, paths, read, known, seen_now)
        except Exception:
            if self.unexpected_out_state_mapping != "auto" or lanes is None:
                raise
            candidates = frozenset(
                st
                for st in seen_now
                if st not in known
                and not isinstance(st, RandomState)
                and not is_match(match_axis(self._state_in, paths.get(st, ()), st))
                and lane_sized(st)
            )
            if not candidates:
                raise
            return super()._run_probe(call, setup, paths, read, known | candidates)

    # -- plan --------------------------------------------------------------------
    def _decide(
        self,
        found: ProbeResult,
        paths: dict[State, tuple],
        setup: LaneSetup,
        read: Callable[[State], Any],
    ) -> Plan:
        api, lanes, first = self._api, setup.lanes, setup.source
        inputs: dict[State, int | None] = {}
        outputs: dict[State, int | None] = {}
        rngs = [st for st in found.reads if isinstance(st, RandomState)]
        # States mapped in by state_in_axes fix the lane count when no argument did.
        mapped_in: dict[State, int] = {}
        for st in dict.fromkeys([*found.reads, *found.writes]):
            if isinstance(st, RandomState):
                continue
            axis = match_axis(self._state_in, paths.get(st, ()), st)
            if is_match(axis) and axis is not None:
                mapped_in[st] = axis
                size = self._check_state_axis(st, paths.get(st, ()), read(st), axis)
                if lanes is None:
                    lanes, first = size, f"{st._label()} (state_in_axes)"
                elif size != lanes:
                    raise BatchAxisError(
                        _MSG_LANE_MISMATCH.format(
                            api=api, what=f"{st._label()} at path {_fmt_path(paths.get(st, ()))}",
                            size=size, first=first, lanes=lanes,
                        )
                    )
        if lanes is None:
            raise ValueError(_MSG_NO_LANES.format(api=api, in_axes=self.in_axes))
        check = getattr(self.mapping_fn, "check_lanes", None)
        if check is not None:
            check(lanes, api)

        read_set = set(found.reads)
        for st in found.reads:
            if not isinstance(st, RandomState):
                inputs[st] = mapped_in.get(st)
        for st in found.writes:
            if isinstance(st, RandomState):
                continue  # the stream advances once per call, outside the lanes
            path = paths.get(st, ())
            varies = found.varying.get(st, False)
            out_axis = match_axis(self._state_out, path, st)
            where = dict(api=api, state=st._label(), path=_fmt_path(path), lanes=lanes)
            if st in mapped_in:
                if is_match(out_axis) and out_axis != mapped_in[st]:
                    raise BatchAxisError(
                        _MSG_AXIS_CONFLICT.format(
                            in_axis=mapped_in[st], out_axis=out_axis, **where
                        )
                    )
                outputs[st] = mapped_in[st]
            elif is_match(out_axis):
                if out_axis is None and varies:
                    raise BatchAxisError(_MSG_UNBATCHED_VARYING.format(**where))
                outputs[st] = out_axis if varies else None
            elif not varies:
                outputs[st] = None
            else:
                outputs[st] = self._undeclared(st, st in read_set, read(st), lanes, where, inputs)
        signature = tuple(
            (st, state_signature(read(st)))
            for st in dict.fromkeys([*inputs, *rngs, *outputs])
        )
        dummy = not any(a is not None for a in inputs.values()) and not rngs and not any(
            setup.varying
        )
        return Plan(
            inputs=tuple(inputs), in_axes=tuple(inputs.values()), rngs=tuple(rngs),
            outputs=tuple(outputs), out_axes=tuple(outputs.values()), signature=signature,
            lanes=lanes, dummy_lanes=dummy,
        )

    def _undeclared(
        self,
        st: State,
        was_read: bool,
        value: Any,
        lanes: int,
        where: dict[str, Any],
        inputs: dict[State, int | None],
    ) -> int:
        mode = self.unexpected_out_state_mapping
        if mode == "raise":
            raise BatchAxisError(_MSG_UNDECLARED.format(**where))
        if mode == "warn":
            warnings.warn(_MSG_AUTO_WARN.format(**where), UserWarning, stacklevel=4)
        if mode != "auto" or not was_read:
            return 0
        leaves = jax.tree_util.tree_leaves(value)
        sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
        self._per_lane.add(st)
        if sizes == {lanes}:
            inputs[st] = 0  # each lane reads and writes its own slice
        elif st not in _AUTO_STACK_WARNED:
            _AUTO_STACK_WARNED.add(st)
            shape = np.shape(leaves[0]) if leaves else ()
            warnings.warn(
                _MSG_AUTO_STACK.format(size=next(iter(sizes)), shape=shape, **where),
                UserWarning,
                stacklevel=4,
            )
        return 0

    # -- transform ---------------------------------------------------------------
    def _transform(self, pure: Callable[..., Any], plan: Plan, n_dyn: int) -> Callable[..., Any]:
        in_axes = (
            *self._dyn_in_axes(n_dyn),
            0,
            list(plan.in_axes),
            [0] * len(plan.rngs),
            *((0,) if plan.dummy_lanes else ()),
        )
        # Tuples, not lists: in a jax.distributed group (several processes), jax.pmap
        # caches on the out_axes tree and fails on a list with "unhashable type: 'list'"
        # (jax 0.10.2, pmap.global_array_to_host_local_array; a user's dict out_axes fails
        # there alike, "unhashable type: 'dict'", and runs only on the direct path of
        # global inputs, _GroupPmapWrapper._program). The pure function returns its new
        # state values as a tuple to match (tests/core/test_multiprocess.py).
        out_axes = (self.out_axes, tuple(plan.out_axes))
        mapped = self.mapping_fn(
            pure, in_axes=in_axes, out_axes=out_axes, axis_name=self.axis_name,
            axis_size=self.axis_size,
        )
        if self.mapping_fn is jax.vmap or getattr(self.mapping_fn, "func", None) is jax.vmap:
            # jax.vmap re-traces on every call; under jax.jit a warm call runs no Python.
            mapped = jax.jit(mapped)
        elif jax.process_count() > 1 and not hasattr(mapped, "in_axes"):
            from statehost.transform._transforms import group_mapped

            mapped = group_mapped(mapped, pure, in_axes, out_axes, self.axis_name,
                                  self.axis_size)  # a custom mapping_fn (a jax.pmap) too
        return mapped

    def _rng_keys(self, plan: Plan, read: Callable[[State], Any]) -> tuple[list[Any], list[Any]]:
        if not plan.rngs:
            return [], []
        lane_keys, advanced = [], []
        for st in plan.rngs:
            new, keys = _split_keys(read(st), plan.lanes)
            lane_keys.append(keys)
            advanced.append(new)
        return lane_keys, advanced

    def _lane_ids(self, lanes: int | None) -> Any:
        return np.arange(lanes or 1, dtype=np.int32)


@functools.partial(jax.jit, static_argnums=1)
def _split_keys(key: Any, lanes: int) -> tuple[Any, Any]:
    """One split: the advanced stream key and one key per lane."""
    keys = jax.random.split(key, lanes + 1)
    return keys[0], keys[1:]


def _lane_leaf(leaf: Any, axis: int | None, what: str, api: str) -> tuple[Any, int | None]:
    """One lane's abstract value of an argument leaf, and its size on ``axis``."""
    if not hasattr(leaf, "shape"):
        if axis is None or leaf is None:
            return leaf, None
        leaf = np.asarray(leaf)
    shape = tuple(leaf.shape)
    dtype = leaf.dtype
    weak = getattr(leaf, "weak_type", False)
    if axis is None:
        return jax.ShapeDtypeStruct(shape, dtype, weak_type=weak), None
    if not -len(shape) <= axis < len(shape):
        raise ValueError(
            f"{api}: in_axes maps {what} on axis {axis}, but that argument has shape {shape} "
            f"(rank {len(shape)}). Use an axis below {len(shape)}, or None to pass it to every "
            f"lane unmapped."
        )
    lane_shape = drop_axis(shape, axis)
    return jax.ShapeDtypeStruct(lane_shape, dtype, weak_type=weak), shape[axis]
