"""The machinery every stateful transform shares: probe, plan, cache, run, commit.

A call goes through four steps, in this order (style rule 14):

1. *probe* (cold calls only): trace the function once to find the states it
   reads and writes (``_probe.probe``), and decide how each one enters and
   leaves the transformed function (a :class:`Plan`);
2. build the pure function ``(*args, kwargs, state_values, keys) ->
   (outputs, new_state_values)`` and transform it (``jax.pmap``, ``jax.vmap``
   under ``jax.jit``, or ``jax.jit``);
3. run it on the states' current values;
4. write the new values into the ``State`` objects, only after everything
   succeeded: a failing call leaves every state as it was.

Plans are cached on the argument signature (tree structure, shapes, dtypes,
static arguments) and checked against the current shapes of their states, so
a warm call runs none of the user's Python.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.extend import core as jex

from statehost._state import State, StateTrace, StateTraceError, active_trace
from statehost.nn._module import state_paths
from statehost.transform._cache import CacheInfo, register
from statehost.transform._commit import pending_writes
from statehost.transform._placement import Placement
from statehost.transform._probe import (
    ProbeResult,
    drop_axis,
    lane_placeholder,
    leaf_signature,
    probe,
)
from statehost.transform._programs import ProgramCache, SharedPlan, Sharing

__all__ = ["LaneSetup", "Plan", "StatefulCall"]

_MSG_STALE_READ = (
    "{api}: {fun} read {state} when it was traced to be compiled, but not when it was "
    "probed with the same argument shapes. The set of states a function touches must be "
    "decided by its arguments' shapes and static arguments only (as with jax.jit). If it "
    "depends on Python-side state, pass that as a static argument, or call "
    "statehost.clear_caches() after changing it."
)
_MSG_STALE_WRITE = (
    "{api}: {fun} wrote {state} when it was traced to be compiled, but not when it was "
    "probed with the same argument shapes. " + _MSG_STALE_READ.split(". ", 1)[1]
)
_MSG_UNHASHABLE_STATIC = (
    "{api}: the static argument at position {index} ({value!r}) is not hashable. Static "
    "arguments key the compile cache; pass a hashable value (a tuple instead of a list, for "
    "example), or make the argument a traced array instead."
)


@dataclass(eq=False)
class Plan:
    """How one argument signature runs: which states go in and out, on which axes.

    Attributes:
        inputs: states whose values are passed in; ``in_axes`` gives each one's
            mapped axis (``None``: the same value for every lane).
        rngs: random states; each lane receives its own key.
        outputs: states written back; ``out_axes`` gives the stacked axis (``None``:
            written once, unbatched).
        signature: ``(state, shape signature)`` pairs this plan was made for.
        lanes: the number of lanes (``None`` for ``jit``).
        dummy_lanes: whether a per-lane index is fed because nothing else is mapped.
        compiled: the transformed pure function.
        calls_python: whether the traced program calls back into Python (a host
            callback, ``jax.debug.print``): such a program is never shared, since the
            callback is the code of the transform that traced it, states and all.
    """

    inputs: tuple[State, ...]
    in_axes: tuple[int | None, ...]
    rngs: tuple[State, ...]
    outputs: tuple[State, ...]
    out_axes: tuple[int | None, ...]
    signature: tuple[tuple[State, Any], ...]
    lanes: int | None
    dummy_lanes: bool
    compiled: Callable[..., Any] | None = None
    calls_python: bool = False


@dataclass
class LaneSetup:
    """What a transform knows about its lanes before probing.

    Attributes:
        lanes: the number of lanes, when the arguments or options tell (``None`` for jit).
        lane_args: one lane's ``(args, kwargs)`` as abstract values.
        varying: for each leaf of ``lane_args``, whether it differs across lanes.
        axis_env: ``[(axis_name, size)]`` to bind while probing, or ``None``.
        source: what fixed ``lanes`` (for error messages).
    """

    lanes: int | None
    lane_args: Any
    varying: list[bool]
    axis_env: list[tuple[Any, int]] | None
    source: str = ""


def state_signature(value: Any) -> Any:
    """A hashable description of a state value's structure, shapes and dtypes."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return leaf_signature(value)
    leaves, treedef = jax.tree_util.tree_flatten(value)
    return treedef, tuple(leaf_signature(x) for x in leaves)


def describe_fun(fun: Any) -> str:
    name = getattr(fun, "__qualname__", None) or type(fun).__qualname__
    return f"'{name}'"


class StatefulCall:
    """Base of the stateful transforms: caching and the call protocol.

    Subclasses provide :meth:`_lane_setup` (lanes and per-lane argument
    shapes), :meth:`_first_read` (what a state's first read sees in the probe),
    :meth:`_decide` (the plan from a probe) and :meth:`_transform` (turn the
    pure function into a compiled one).
    """

    _api = "transform"

    def __init__(self, fun: Callable[..., Any], static_argnums: tuple[int, ...]):
        if not callable(fun):
            raise TypeError(
                f"statehost.transform.{self._api}: expected a callable (a function, a bound "
                f"method or a Module with __call__), got {fun!r} of type {type(fun).__name__}."
            )
        self.origin_fun = fun
        self._static_argnums = tuple(sorted(static_argnums))
        self._placement: Placement | None = None
        self._init_cache()
        functools.update_wrapper(self, fun, updated=())

    def _init_cache(self) -> None:
        self._cache: dict[Hashable, list[Plan]] = {}
        self._hits = self._misses = self._traces = self._shared = 0
        self._sharing: Sharing | None = None
        # id(plan) -> the ProgramCache's context for a new plan's first run (see _plan_for).
        self._first_runs: dict[int, Callable[[], Any]] = {}
        # States an 'auto' mapping found to be per-lane read-modify-write buffers.
        self._per_lane: weakref.WeakSet[State] = weakref.WeakSet()
        register(self)

    # -- placement ------------------------------------------------------------
    @property
    def placement(self) -> Placement | None:
        """Where calls run: ``None`` in this process, else the placement that runs them
        (``client.pmap`` places a transform on its server; see ``_placement``)."""
        return self._placement

    def _placement_repr(self) -> str:
        return "" if self._placement is None else f", placement={self._placement!r}"

    def _repr_html_(self) -> str:
        """The notebook display: the transform, its axes, and where it runs."""
        from statehost._display import html_table

        rows = [("transform", type(self).__name__), ("function", describe_fun(self.origin_fun))]
        rows += [(name, repr(getattr(self, name))) for name in (
            "in_axes", "out_axes", "axis_name", "state_in_axes", "state_out_axes")
            if hasattr(self, name)]
        describe = getattr(self._placement, "describe", None)
        rows += list(describe().items()) if describe is not None else [("runs", "here")]
        return html_table(None, rows)

    # -- cache ----------------------------------------------------------------
    def cache_info(self) -> CacheInfo:
        """Hits, misses, user-function traces and cached entries of this transform.

        Example:
            >>> import jax.numpy as jnp, statehost
            >>> f = statehost.transform.jit(lambda x: x + 1)
            >>> _ = f(jnp.ones(2)); _ = f(jnp.ones(2))
            >>> f.cache_info().hits
            1
        """
        entries = sum(len(plans) for plans in self._cache.values())
        return CacheInfo(self._hits, self._misses, self._traces, entries, self._shared)

    def clear_cache(self) -> None:
        """Forgets every plan and compiled function of this transform."""
        self._cache.clear()

    def _count_trace(self) -> None:
        self._traces += 1

    def share_programs(self, cache: ProgramCache, code: Hashable | None, states: Sequence[State]
                       ) -> None:
        """Shares this transform's plans and compiled programs through ``cache``.

        A call this transform has no plan for first looks in ``cache`` for one that
        another transform with the same ``code`` made for the same call signature and
        state shapes, and takes it (no trace, no compile: ``cache_info().shared``);
        a plan it makes itself is offered there. The caller vouches that equal
        ``code`` means equal code, and that ``states`` lists this transform's states
        in an order equal code agrees on (a server numbers them in the order the
        pickle met them). A plan that uses a state missing from ``states`` is never
        shared.

        Arguments:
            cache: the :class:`~statehost.transform.ProgramCache` to share through.
            code: a hashable key of the code (a digest of its pickle, say); ``None``:
                share nothing, only tell the cache's observer about each program built.
            states: this transform's states, numbered by position.

        Returns:
            None.

        Example:
            >>> import jax.numpy as jnp, statehost
            >>> cache = statehost.transform.ProgramCache()
            >>> f = statehost.transform.jit(lambda x: x * 2)
            >>> f.share_programs(cache, "double", [])
            >>> _ = f(jnp.ones(3)); len(cache)
            1
        """
        ordered = tuple(dict.fromkeys(states))
        self._sharing = Sharing(cache, code, ordered, {st: i for i, st in enumerate(ordered)})

    # -- pickling -------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # The placement stays behind: an unpickled transform runs where it lands.
        for key in ("_cache", "_hits", "_misses", "_traces", "_per_lane", "__wrapped__",
                    "_placement", "_shared", "_sharing", "_first_runs"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__wrapped__ = self.origin_fun
        self._placement = None
        self._init_cache()

    # -- the call -------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._placement is not None:
            return self._placement.run(self, args, kwargs)
        plan, dyn, read, write = self._plan_for(args, kwargs)
        first_run = self._first_runs.pop(id(plan), None) if self._first_runs else None
        if first_run is None:
            return self._run(plan, dyn, kwargs, read, write)
        with first_run():
            return self._run(plan, dyn, kwargs, read, write)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """The lowered program a call with these arguments runs, without running it.

        Finds or makes the plan exactly as a call does (a cold signature is probed and
        counted as a miss; the call that follows is then a hit), and lowers its
        transformed function for the states' current values. ``lower(...).compile()``
        compiles what the call will run, and JAX reuses that compilation for the call, so
        a server can read ``memory_analysis()`` before it runs anything.

        Arguments:
            args, kwargs: the call's arguments.

        Returns:
            A ``jax.stages.Lowered``, or ``None`` when the mapping function has no
            ``lower`` (a custom ``mapping_fn``).

        Example:
            >>> import jax.numpy as jnp, statehost
            >>> f = statehost.transform.jit(lambda x: x + 1)
            >>> f.lower(jnp.ones(2)).compile().memory_analysis().output_size_in_bytes
            8
        """
        plan, dyn, read, _ = self._plan_for(args, kwargs, count_hit=False)
        assert plan.compiled is not None
        lower = getattr(plan.compiled, "lower", None)
        if lower is None:
            return None
        values = [read(st) for st in plan.inputs]
        keys, _ = self._rng_keys(plan, read)  # the advanced stream is dropped: nothing runs
        extra = (self._lane_ids(plan.lanes),) if plan.dummy_lanes else ()
        return lower(*dyn, kwargs, values, keys, *extra)

    def _plan_for(self, args: tuple[Any, ...], kwargs: dict[str, Any], count_hit: bool = True
                  ) -> tuple[
            Plan, tuple[Any, ...], Callable[[State], Any], Callable[[State, Any], None]]:
        """The cached (or new) plan for these arguments, the dynamic arguments, and where
        state values are read from and written to."""
        outer = active_trace()
        if self._static_argnums:
            dyn, statics = self._split_static(args)
        else:
            dyn, statics = args, ()
        leaves, treedef = jax.tree_util.tree_flatten((dyn, kwargs))
        key = (treedef, tuple(map(leaf_signature, leaves)), statics)
        # Where new state values go: the enclosing trace, a host's pending commit, or
        # straight into the State objects.
        pending = pending_writes() if outer is None else None
        if outer is not None:
            read, write = outer.read, outer.write
        elif pending is not None:
            read, write = pending.read, pending.write
        else:
            read, write = _plain_read, State._commit
        plan = self._lookup(key, read)
        if plan is not None:
            if count_hit:
                self._hits += 1
            return plan, dyn, read, write
        sharing = self._sharing
        if sharing is None:
            self._misses += 1
            plan = self._make_plan(dyn, kwargs, statics, read)
            self._cache.setdefault(key, []).append(plan)
            return plan, dyn, read, write
        shared_key = self._shared_key(sharing, key, statics)
        plan = self._adopt(sharing, shared_key, read) if shared_key is not None else None
        if plan is not None:
            self._shared += 1
            self._cache.setdefault(key, []).append(plan)
            sharing.cache.adopted()
            return plan, dyn, read, write
        self._misses += 1
        plan = self._make_plan(dyn, kwargs, statics, read)
        self._cache.setdefault(key, []).append(plan)
        if shared_key is not None:
            self._offer(sharing, shared_key, plan)
        # JAX compiles the program (or loads it from disk) in its first run: that run tells
        # the cache where it came from.
        self._first_runs[id(plan)] = sharing.cache.built
        return plan, dyn, read, write

    def _split_static(self, args: tuple[Any, ...]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        statics = []
        for i in self._static_argnums:
            if i >= len(args):
                raise ValueError(
                    f"statehost.transform.{self._api}: static argument number {i} was given but "
                    f"the function was called with only {len(args)} positional arguments."
                )
            try:
                hash(args[i])
            except TypeError as exc:
                raise TypeError(
                    _MSG_UNHASHABLE_STATIC.format(api=self._api, index=i, value=args[i])
                ) from exc
            statics.append(args[i])
        dyn = tuple(a for i, a in enumerate(args) if i not in self._static_argnums)
        return dyn, tuple(statics)

    def _merge_static(self, dyn: tuple[Any, ...], statics: tuple[Any, ...]) -> list[Any]:
        args = list(dyn)
        for i, value in zip(self._static_argnums, statics, strict=True):
            args.insert(i, value)
        return args

    def _lookup(self, key: Hashable, read: Callable[[State], Any]) -> Plan | None:
        for plan in self._cache.get(key, ()):
            if all(state_signature(read(st)) == sig for st, sig in plan.signature):
                return plan
        return None

    # -- shared programs ---------------------------------------------------------
    def _shared_key(self, sharing: Sharing, key: Hashable, statics: tuple[Any, ...]
                    ) -> Hashable | None:
        """The key of this call's plans in ``sharing.cache``; ``None``: not shareable.

        Static arguments enter with their types (``1`` and ``True`` are equal keys of a
        dict, not equal programs), and so do the per-lane buffers an ``'auto'`` mapping
        has found, since they change what a probe decides.
        """
        if sharing.code is None:
            return None
        per_lane = []
        for st in self._per_lane:
            position = sharing.positions.get(st)
            if position is None:
                return None
            per_lane.append(position)
        return (sharing.code, len(sharing.states), key, tuple(map(type, statics)),
                frozenset(per_lane))

    def _adopt(self, sharing: Sharing, shared_key: Hashable, read: Callable[[State], Any]
               ) -> Plan | None:
        """A plan for this transform's states from one another transform shared."""
        states = sharing.states
        for shared in sharing.cache.candidates(shared_key):
            if all(state_signature(read(states[i])) == sig for i, sig in shared.signature):
                self._per_lane.update(states[i] for i in shared.per_lane)
                return Plan(
                    inputs=tuple(states[i] for i in shared.inputs), in_axes=shared.in_axes,
                    rngs=tuple(states[i] for i in shared.rngs),
                    outputs=tuple(states[i] for i in shared.outputs), out_axes=shared.out_axes,
                    signature=tuple((states[i], sig) for i, sig in shared.signature),
                    lanes=shared.lanes, dummy_lanes=shared.dummy_lanes,
                    compiled=shared.compiled,
                )
        return None

    def _offer(self, sharing: Sharing, shared_key: Hashable, plan: Plan) -> None:
        """Puts ``plan`` in the shared cache, unless it uses a state ``sharing`` does not
        number (one the function found some other way than through its pickle)."""
        where = sharing.positions
        used = [*plan.inputs, *plan.rngs, *plan.outputs, *(st for st, _ in plan.signature),
                *self._per_lane]
        if plan.compiled is None or plan.calls_python or any(st not in where for st in used):
            return
        sharing.cache.add(shared_key, SharedPlan(
            inputs=tuple(where[st] for st in plan.inputs), in_axes=plan.in_axes,
            rngs=tuple(where[st] for st in plan.rngs),
            outputs=tuple(where[st] for st in plan.outputs), out_axes=plan.out_axes,
            signature=tuple((where[st], sig) for st, sig in plan.signature),
            lanes=plan.lanes, dummy_lanes=plan.dummy_lanes, compiled=plan.compiled,
            per_lane=frozenset(where[st] for st in self._per_lane),
        ))

    # -- cold path --------------------------------------------------------------
    def _make_plan(
        self,
        dyn: tuple[Any, ...],
        kwargs: dict[str, Any],
        statics: tuple[Any, ...],
        read: Callable[[State], Any],
    ) -> Plan:
        setup = self._lane_setup(dyn, kwargs)
        paths = state_paths(self.origin_fun)

        def call(lane: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
            lane_dyn, lane_kwargs = lane
            return self.origin_fun(*self._merge_static(lane_dyn, statics), **lane_kwargs)

        found = self._run_probe(call, setup, paths, read)
        plan = self._decide(found, paths, setup, read)
        # Trace the pure function once, here, and give JAX a function that replays
        # the jaxpr: when JAX re-traces (the states come back from pmap with a new
        # sharding, say), it replays the jaxpr and never runs the user's Python again.
        pure = self._pure_function(plan, statics)
        lane_inputs = (
            *setup.lane_args[0],
            setup.lane_args[1],
            [_lane_aval(read(st), ax) for st, ax in zip(plan.inputs, plan.in_axes, strict=True)],
            [_lane_aval(read(st), None) for st in plan.rngs],
            *((jax.ShapeDtypeStruct((), np.int32),) if plan.dummy_lanes else ()),
        )
        closed, out_shape = jax.make_jaxpr(pure, axis_env=setup.axis_env or [], return_shape=True)(
            *lane_inputs
        )
        plan.compiled = self._transform(_replay(closed, out_shape), plan, len(dyn))
        plan.calls_python = _calls_python(closed.jaxpr)
        return plan

    def _run_probe(
        self,
        call: Callable[[Any], Any],
        setup: LaneSetup,
        paths: dict[State, tuple],
        read: Callable[[State], Any],
        per_lane: frozenset[State] = frozenset(),
        seen: list[State] | None = None,
    ) -> ProbeResult:
        """Probes once; ``per_lane`` states are seen one slice (axis 0) per lane."""

        def first_read(state: State, flag: Any) -> Any:
            if seen is not None:
                seen.append(state)
            value = read(state)
            if state in per_lane:
                return lane_placeholder(value, 0, flag)
            return self._first_read(state, paths.get(state, ()), value, flag)

        return probe(
            call, setup.lane_args, setup.varying, first_read, setup.axis_env, self._count_trace
        )

    def _pure_function(self, plan: Plan, statics: tuple[Any, ...]) -> Callable[..., Any]:
        """``(*dyn_args, kwargs, state_values, keys[, lane_ids]) -> (out, new_values)``."""
        known = (*plan.inputs, *plan.rngs)
        allowed = set(known) | set(plan.outputs)
        api, fun_name = self._api, describe_fun(self.origin_fun)

        def stale_read(state: State) -> Any:
            raise StateTraceError(
                _MSG_STALE_READ.format(api=api, fun=fun_name, state=state._label())
            )

        def pure(*flat: Any) -> Any:
            self._count_trace()
            if plan.dummy_lanes:
                flat = flat[:-1]
            *dyn, kwargs, values, keys = flat
            trace = StateTrace(on_first_read=stale_read)
            trace.values.update(zip(known, (*values, *keys), strict=True))
            with trace:
                out = self.origin_fun(*self._merge_static(tuple(dyn), statics), **kwargs)
            for state in trace.write_order:
                if state not in allowed:
                    raise StateTraceError(
                        _MSG_STALE_WRITE.format(api=api, fun=fun_name, state=state._label())
                    )
            return out, tuple(trace.values[s] for s in plan.outputs)

        return pure

    # -- warm path --------------------------------------------------------------
    def _run(
        self,
        plan: Plan,
        dyn: tuple[Any, ...],
        kwargs: dict[str, Any],
        read: Callable[[State], Any],
        write: Callable[[State, Any], None],
    ) -> Any:
        values = [read(st) for st in plan.inputs]
        keys, advanced = self._rng_keys(plan, read)
        extra = (self._lane_ids(plan.lanes),) if plan.dummy_lanes else ()
        assert plan.compiled is not None
        out, new_values = plan.compiled(*dyn, kwargs, values, keys, *extra)
        # Commit only now that the whole call succeeded.
        for st, v in zip(plan.outputs, new_values, strict=True):
            write(st, v)
        for st, v in zip(plan.rngs, advanced, strict=True):
            write(st, v)
        return out

    # -- hooks ------------------------------------------------------------------
    def _lane_setup(self, dyn: tuple[Any, ...], kwargs: dict[str, Any]) -> LaneSetup:
        raise NotImplementedError

    def _first_read(self, state: State, path: tuple, value: Any, flag: Any) -> Any:
        raise NotImplementedError

    def _decide(
        self,
        found: ProbeResult,
        paths: dict[State, tuple],
        setup: LaneSetup,
        read: Callable[[State], Any],
    ) -> Plan:
        raise NotImplementedError

    def _transform(self, pure: Callable[..., Any], plan: Plan, n_dyn: int) -> Callable[..., Any]:
        raise NotImplementedError

    def _rng_keys(self, plan: Plan, read: Callable[[State], Any]) -> tuple[list[Any], list[Any]]:
        return [], []

    def _lane_ids(self, lanes: int | None) -> Any:
        raise NotImplementedError


def _plain_read(state: State) -> Any:
    return state._resolved()  # a DeferredValue is fetched before the function sees it


def _lane_aval(value: Any, axis: int | None) -> Any:
    """One lane's ``ShapeDtypeStruct`` of a state value (``axis`` removed)."""

    def one(leaf: Any) -> jax.ShapeDtypeStruct:
        aval = jax.typeof(leaf)
        shape = drop_axis(aval.shape, axis)
        return jax.ShapeDtypeStruct(shape, aval.dtype, weak_type=aval.weak_type)

    return jax.tree_util.tree_map(one, value)


def _replay(closed: Any, out_shape: Any) -> Callable[..., Any]:
    """A function of the same pytree arguments that evaluates ``closed``."""
    evaluate = jex.jaxpr_as_fun(closed)
    out_tree = jax.tree_util.tree_structure(out_shape)

    def replay(*args: Any) -> Any:
        return jax.tree_util.tree_unflatten(out_tree, evaluate(*jax.tree_util.tree_leaves(args)))

    return replay


def _calls_python(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (or one nested in it: cond branches, scan bodies...) has a host
    callback (``pure_callback``, ``io_callback``, ``jax.debug.callback`` / ``print``)."""
    for eqn in jaxpr.eqns:
        if "callback" in eqn.primitive.name:
            return True
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr, or a Jaxpr
                if hasattr(inner, "eqns") and _calls_python(inner):
                    return True
    return False
