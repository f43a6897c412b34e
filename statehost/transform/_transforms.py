"""``pmap`` and ``vmap``: the seed's entry points, each building a ``StatefulMapping``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, overload

import jax
import numpy as np

from statehost.transform._axes import argnums
from statehost.transform._jit import MISSING
from statehost.transform._mapping import Mode, StatefulMapping

__all__ = ["PmapMapping", "pmap", "vmap"]

_MSG_TOO_MANY_LANES = (
    "{api}: the call maps {lanes} lanes, but {where} has only {count} device(s) ({devices}). "
    "pmap puts one lane on each device. Fix it in one of these ways:\n"
    "  1. map over at most {count} lanes (reshape the data to ({count}, ...));\n"
    "  2. use statehost.transform.vmap, which maps any number of lanes on one device;\n"
    "  3. on a CPU-only host, provision more virtual devices before JAX starts: "
    "jax.config.update('jax_num_cpu_devices', {lanes})."
)
_MSG_DEVICES_MISMATCH = (
    "{api}: the call maps {lanes} lanes but devices= lists {count} device(s) ({devices}). "
    "With devices=, the mapped size must equal the number of devices: pass devices={{...}}[:"
    "{lanes}] or map over {count} lanes."
)

_MSG_OTHER_DEVICES = (
    "pmap: a state or argument laid out over devices {have} cannot move to the devices "
    "{want} of this pmap in a jax.distributed group (JAX reshards a global array only "
    "within its own devices). Fix: map over the same devices as the call that last wrote "
    "it, or push the value again (a fresh upload is whole on every device)."
)


class PmapMapping:
    """``mapping_fn`` of ``pmap``: ``jax.pmap`` with its device and donation options.

    A small picklable object rather than a closure, so a ``pmap`` can be
    shipped with cloudpickle (devices travel as ``(platform, id)`` pairs).
    """

    def __init__(
        self,
        devices: Sequence[Any] | None = None,
        backend: str | None = None,
        donate_argnums: tuple[int, ...] = (),
    ):
        self.devices = list(devices) if devices is not None else None
        self.backend = backend
        self.donate_argnums = donate_argnums

    def __call__(
        self,
        fun: Callable[..., Any],
        *,
        in_axes: Any,
        out_axes: Any,
        axis_name: Any,
        axis_size: int | None,
    ) -> Callable[..., Any]:
        mapped = jax.pmap(
            fun,
            axis_name=axis_name,
            in_axes=in_axes,
            out_axes=out_axes,
            devices=self.devices,
            backend=self.backend,
            axis_size=axis_size,
            donate_argnums=self.donate_argnums,
        )
        if jax.process_count(self.backend) == 1:
            return mapped
        return _GroupPmapWrapper(mapped, in_axes, out_axes, self.devices, self.backend,
                                 fun=fun, axis_name=axis_name, axis_size=axis_size,
                                 direct=not self.donate_argnums)

    def check_lanes(self, lanes: int, api: str) -> None:
        """Raises a clear error when ``lanes`` cannot be placed one per device."""
        if self.devices is not None:
            if lanes != len(self.devices):
                raise ValueError(
                    _MSG_DEVICES_MISMATCH.format(
                        api=api, lanes=lanes, count=len(self.devices), devices=self.devices
                    )
                )
            return
        group = jax.process_count(self.backend) > 1  # lanes may span the group's devices
        devices = (jax.devices if group else jax.local_devices)(backend=self.backend)
        if lanes > len(devices):
            where = (f"backend {self.backend!r}" if self.backend
                     else "this jax.distributed group" if group else "this host")
            kinds = sorted({d.platform for d in devices})
            raise ValueError(
                _MSG_TOO_MANY_LANES.format(
                    api=api, lanes=lanes, where=where, count=len(devices), devices=", ".join(kinds)
                )
            )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.devices is not None:
            state["devices"] = [(d.platform, d.id) for d in self.devices]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.devices is not None:
            by_key = {(d.platform, d.id): d for d in jax.devices()}
            self.devices = [by_key[tuple(key)] for key in self.devices]

    def __repr__(self) -> str:
        return (
            f"jax.pmap(devices={self.devices!r}, backend={self.backend!r}, "
            f"donate_argnums={self.donate_argnums!r})"
        )


class _GroupPmapWrapper:
    """``jax.pmap`` in a ``jax.distributed`` group, global arrays in, global arrays out.

    Multi-controller ``jax.pmap`` takes either each process's host-local lanes or global
    arrays spanning every process's devices, but always returns host-local arrays (jax
    0.10.2, ``pmap.global_array_to_host_local_array``). A state kept as a global array
    (a server's, shared by every process of its group) must stay one, so when any input is
    global the outputs are made global again (no copy: each process's shards become its
    part of the global array). Host-local inputs get host-local outputs, as in JAX.

    A global input must also be laid out as pmap lays out its lanes (jax 0.10.2 refuses
    any other sharding: "Sharding passed to jit does not match the sharding on the
    respective arg"), so one that is not (a server's freshly uploaded state or argument,
    replicated on every device) is resharded to one lane per device first: every
    process already holds the whole value, so that moves nothing between processes.

    **Global in, global out, directly.** When every input is a global array (a server's
    states and arguments always are), the call skips ``jax.pmap`` for what it is inside
    (jax 0.10.2, ``jax/_src/pmap.py``): a ``jax.jit`` of a ``shard_map`` over the lanes,
    each lane's mapped axes squeezed in and expanded out. ``jax.pmap`` itself would make
    its host-local inputs global, run that program, and make its outputs host-local, which
    this wrapper then made global again; measured in a 2 x 4 CPU-device group, that cost
    ~150 us of each process's CPU per tiny call, against ~35 us for the program called
    directly. The program is built once per argument structure and lane layout, with the
    in and out shardings the other path gives (``_lanes_sharding``), so a state keeps one
    layout and no call compiles twice. ``direct=False`` (donation; a custom
    ``mapping_fn``, which is no ``jax.pmap``) keeps the path through ``mapped``.
    """

    def __init__(self, mapped: Callable[..., Any], in_axes: Any, out_axes: Any,
                 devices: Sequence[Any] | None, backend: str | None, *,
                 fun: Callable[..., Any], axis_name: Any, axis_size: int | None,
                 direct: bool = False):
        self.fun, self.axis_name, self.axis_size = fun, axis_name, axis_size
        self.mapped = mapped
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.devices = devices
        self.backend = backend
        # The direct program needs plain axes (None or counted from the front), an axis
        # name a mesh can take, and no axis_size check that jax.pmap would make.
        self.direct = direct and axis_size is None and isinstance(axis_name, str | None) \
            and _plain_axes(in_axes) and _plain_axes(out_axes)
        self._programs: dict[Any, Callable[..., Any]] = {}

    def _mesh(self, in_axes: tuple[Any, ...], args: tuple[Any, ...]) -> Any:
        """The lanes' devices: ``devices=``, else the first ``lanes`` of the group's (as
        ``jax.pmap`` picks them); ``None`` when there are more lanes than devices (a custom
        ``mapping_fn`` that is no pmap: its inputs are left as they are)."""
        if self.devices:
            return _lanes_mesh(tuple(self.devices))
        lanes = self.axis_size
        if lanes is None:
            sizes = []
            _ = [_tree_with_axes(lambda axis, leaf: sizes.append(np.shape(leaf)[axis])
                                 if axis is not None else None, axes, sub)
                 for axes, sub in zip(in_axes, args, strict=True)]
            lanes = sizes[0] if sizes else None
        devices = jax.devices(backend=self.backend)
        if lanes is None or lanes > len(devices):
            return None
        return _lanes_mesh(tuple(devices[:lanes]))

    def __call__(self, *args: Any) -> Any:
        leaves = jax.tree_util.tree_leaves(args)
        if all(getattr(x, "is_fully_addressable", True) for x in leaves):
            return self.mapped(*args)
        in_axes = self.in_axes if isinstance(self.in_axes, tuple) else (self.in_axes,) * len(args)
        mesh = self._mesh(in_axes, args)
        if mesh is None:
            return self.mapped(*args)
        args = tuple(_tree_with_axes(lambda axis, leaf: _as_lanes(leaf, axis, mesh), axes, sub)
                     for axes, sub in zip(in_axes, args, strict=True))
        if not any(d.process_index == jax.process_index() for d in mesh.devices.flat):
            return self._elsewhere(mesh, args)
        program = self._program(mesh, in_axes, args) if self.direct else None
        if program is not None:
            return program(*args)
        out = self.mapped(*args)
        return _tree_with_axes(lambda axis, leaf: _as_global(leaf, axis, mesh),
                               self.out_axes, out)

    def _program(self, mesh: Any, in_axes: tuple[Any, ...], args: tuple[Any, ...]
                 ) -> Callable[..., Any] | None:
        """The direct program for these (lane-laid-out) inputs, or ``None`` when one of
        them is not a global array, or maps an axis it lacks or of another size than the
        lanes' (``jax.pmap`` then runs, and raises what it raises)."""
        leaves, treedef = jax.tree_util.tree_flatten(args)
        if not all(isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves):
            return None
        key = (treedef, mesh, tuple(x.shape for x in leaves))
        program = self._programs.get(key)
        if program is None and key not in self._programs:
            program = self._programs[key] = self._build(mesh, in_axes, args)
        return program

    def _build(self, mesh: Any, in_axes: tuple[Any, ...], args: tuple[Any, ...]
               ) -> Callable[..., Any] | None:
        """``jax.pmap``'s own program, as jax 0.10.2 builds it, with global shardings."""
        axes: list[Any] = []
        _tree_with_axes(lambda axis, leaf: axes.append((axis, leaf.shape)), in_axes, args)
        if any(axis is not None and (axis >= len(shape) or shape[axis] != mesh.devices.size)
               for axis, shape in axes):
            return None
        name = "_internal_pmap_axis_name" if self.axis_name is None else self.axis_name
        # The program's collectives name the pmap's axis; its arrays keep the lanes mesh.
        named = jax.sharding.Mesh(mesh.devices, (name,))
        fun, out_axes = self.fun, self.out_axes

        def lane(*lane_args: Any) -> Any:
            lane_args = _tree_with_axes(
                lambda axis, x: x if axis is None else jax.lax.squeeze(x, [axis]),
                in_axes, lane_args)
            return _tree_with_axes(
                lambda axis, x: x if axis is None else jax.lax.expand_dims(x, [axis]),
                out_axes, fun(*lane_args))

        def specs(axes: Any, tree: Any) -> Any:
            return _tree_with_axes(lambda axis, x: _lane_spec(axis, x.ndim, name), axes, tree)

        def shardings(axes: Any, tree: Any) -> Any:
            return _tree_with_axes(lambda axis, x: _lanes_sharding(mesh, axis, x.ndim), axes,
                                   tree)

        def program(out_specs: Any = None, out_shardings: Any = None) -> Any:
            mapped = jax.shard_map(lane, mesh=named, in_specs=specs(in_axes, args),
                                   out_specs=out_specs, check_vma=False)
            return jax.jit(mapped, in_shardings=shardings(in_axes, args),
                           out_shardings=out_shardings)

        # The outputs' structure and ranks, to lay them out: one abstract trace, once.
        shapes = jax.eval_shape(program(out_specs=jax.sharding.PartitionSpec()), *args)
        return program(specs(out_axes, shapes), shardings(out_axes, shapes))

    def _elsewhere(self, mesh: Any, args: tuple[Any, ...]) -> Any:
        """A pmap on devices that other processes of the group hold, all of them: nothing
        runs here (jax 0.10.2's pmap fails on a process that holds none of its devices, in
        ``mesh._get_local_mesh``), and the outputs are global arrays with no part here,
        as the processes that run it have them."""
        shapes = jax.eval_shape(jax.vmap(
            self.fun, in_axes=self.in_axes, out_axes=self.out_axes, axis_name=self.axis_name,
            axis_size=self.axis_size), *args)

        def absent(axis: int | None, shape: Any) -> Any:
            sharding = jax.sharding.NamedSharding(mesh, _lane_spec(axis, len(shape.shape)))
            return jax.make_array_from_callback(shape.shape, sharding, _no_part,
                                                dtype=shape.dtype)

        return _tree_with_axes(absent, self.out_axes, shapes)


def group_mapped(mapped: Callable[..., Any], fun: Callable[..., Any], in_axes: Any,
                 out_axes: Any, axis_name: Any, axis_size: int | None) -> Callable[..., Any]:
    """A custom ``mapping_fn``'s result in a ``jax.distributed`` group: global arrays in
    and out, as ``pmap``'s own (``_GroupPmapWrapper``)."""
    return _GroupPmapWrapper(mapped, in_axes, out_axes, None, None, fun=fun,
                             axis_name=axis_name, axis_size=axis_size)


def _no_part(index: Any) -> Any:
    raise AssertionError("this process holds no part of the array")


def _tree_with_axes(fun: Callable[[int | None, Any], Any], axes: Any, tree: Any) -> Any:
    """``fun(axis, leaf)`` over ``tree``, with ``axes`` a pmap axes prefix of it."""
    return jax.tree_util.tree_map(
        lambda axis, sub: jax.tree_util.tree_map(lambda leaf: fun(axis, leaf), sub),
        axes, tree, is_leaf=lambda x: x is None)


@functools.lru_cache(maxsize=64)
def _lanes_mesh(devices: tuple[Any, ...]) -> Any:
    """The lanes' ``Mesh``, once per device tuple (a pure function of it: a ``Mesh`` and
    its shardings cost tens of us to build, per call and leaf)."""
    return jax.sharding.Mesh(np.asarray(devices), ("lanes",))


@functools.lru_cache(maxsize=256)
def _lanes_sharding(mesh: Any, axis: int | None, ndim: int) -> Any:
    return jax.sharding.NamedSharding(mesh, _lane_spec(axis, ndim))


def _as_global(leaf: Any, axis: int | None, mesh: Any) -> Any:
    """A host-local output of the group's pmap as the global array it is part of: its
    shards (one lane on each of this process's devices of ``mesh``) rewrapped, with no
    copy, as ``multihost_utils.host_local_array_to_global_array`` does, without its
    per-call primitive and sharding objects (~0.3 ms a call, jax 0.10.2)."""
    if (axis is None or not isinstance(leaf, jax.Array) or not leaf.is_fully_addressable
            or leaf.ndim == 0):
        from jax.experimental import multihost_utils

        return multihost_utils.host_local_array_to_global_array(
            leaf, mesh, _lane_spec(axis, np.ndim(leaf)))
    sharding = _lanes_sharding(mesh, axis, leaf.ndim)
    shards = leaf.addressable_shards
    if len(shards) != leaf.shape[axis] or any(s.data.shape[axis] != 1 for s in shards):
        from jax.experimental import multihost_utils

        return multihost_utils.host_local_array_to_global_array(
            leaf, mesh, _lane_spec(axis, leaf.ndim))
    shape = list(leaf.shape)
    shape[axis] = mesh.devices.size
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding,
                                                    [s.data for s in shards])


def _lane_spec(axis: int | None, ndim: int, name: Any = "lanes") -> Any:
    lanes: list[Any] = [None] * ndim
    if axis is not None:
        lanes[axis] = name
    return jax.sharding.PartitionSpec(*lanes)


def _plain_axes(axes: Any) -> bool:
    """Whether every axis of a pmap axes prefix is ``None`` or counted from the front."""
    return all(type(axis) is int and axis >= 0 for axis in jax.tree_util.tree_leaves(axes))


def _as_lanes(leaf: Any, axis: int | None, mesh: Any) -> Any:
    """A global array laid out as pmap wants it (lanes over ``mesh``, or replicated)."""
    if not isinstance(leaf, jax.Array):
        return leaf
    want = _lanes_sharding(mesh, axis, leaf.ndim)
    if leaf.is_fully_addressable:
        # A host-local input stays as it is, unless it is a state a pmap on other devices
        # of this process left there: the processes that do not hold it fail alike below.
        devices = leaf.sharding.device_set
        if len(devices) > 1 and not devices <= want.device_set:
            raise ValueError(_MSG_OTHER_DEVICES.format(
                have=sorted(d.id for d in devices), want=sorted(d.id for d in want.device_set)))
        return leaf
    if leaf.sharding.is_equivalent_to(want, leaf.ndim):
        return leaf
    if not leaf.sharding.is_fully_replicated:
        if leaf.sharding.device_set == want.device_set:
            return jax.device_put(leaf, want)
        # JAX reshards a global array only within its own devices ("For a cross-host
        # reshard in multi-controller JAX, input and target sharding should have the same
        # set of devices", jax 0.10.2).
        raise ValueError(_MSG_OTHER_DEVICES.format(
            have=sorted(d.id for d in leaf.sharding.device_set),
            want=sorted(d.id for d in want.device_set)))
    # A replicated value (a fresh upload or argument) is whole on every process: its
    # lanes are cut from the local copy, which moves nothing between processes (a
    # device_put to the lanes runs a cross-process program: ~6x the CPU of a tiny call),
    # and works for a pmap(devices=...) on some of the group's devices too. One shard
    # alone (addressable_data): the list of every Shard costs ~12 us a call here.
    host = np.asarray(leaf.addressable_data(0))
    return jax.make_array_from_callback(leaf.shape, want, lambda index: host[index],
                                        dtype=leaf.dtype)


@overload
def pmap(fun: Callable[..., Any], axis_name: Any = ..., **options: Any) -> StatefulMapping: ...
@overload
def pmap(
    fun: Any = ..., axis_name: Any = ..., **options: Any
) -> Callable[..., StatefulMapping]: ...


def pmap(
    fun: Any = MISSING,
    axis_name: Any = None,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    static_broadcasted_argnums: int | Sequence[int] = (),
    devices: Sequence[Any] | None = None,
    backend: str | None = None,
    axis_size: int | None = None,
    donate_argnums: int | Sequence[int] = (),
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: Mode = "auto",
) -> Any:
    """``jax.pmap`` that keeps ``State`` objects consistent across devices.

    Arguments:
        fun: the function, bound method or ``Module``; omit it to get a decorator.
        axis_name, in_axes, out_axes, static_broadcasted_argnums, devices, backend,
            axis_size, donate_argnums: as in ``jax.pmap``.
        state_in_axes, state_out_axes, unexpected_out_state_mapping: see
            :class:`StatefulMapping`.

    Returns:
        A :class:`StatefulMapping`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> @pmap(axis_name="i")
        ... def total(x):
        ...     return jax.lax.psum(x, "i")
        >>> total(jnp.ones(1)).tolist()
        [1.0]
    """
    static, _, shifted = argnums(
        static_broadcasted_argnums, donate_argnums, api="pmap",
        static_name="static_broadcasted_argnums",
    )
    options = dict(
        in_axes=in_axes,
        out_axes=out_axes,
        state_in_axes=state_in_axes,
        state_out_axes=state_out_axes,
        unexpected_out_state_mapping=unexpected_out_state_mapping,
        axis_name=axis_name,
        axis_size=axis_size,
        mapping_fn=PmapMapping(devices, backend, shifted),
        static_argnums=static,
        name="pmap",
    )
    if fun is MISSING:
        return lambda f: StatefulMapping(f, **options)
    return StatefulMapping(fun, **options)


@overload
def vmap(fun: Callable[..., Any], /, **options: Any) -> StatefulMapping: ...
@overload
def vmap(fun: Any = ..., /, **options: Any) -> Callable[..., StatefulMapping]: ...


def vmap(
    fun: Any = MISSING,
    /,
    *,
    in_axes: Any = 0,
    out_axes: Any = 0,
    axis_name: Any = None,
    axis_size: int | None = None,
    spmd_axis_name: Any = None,
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: Mode = "auto",
) -> Any:
    """``jax.vmap`` that passes ``State`` objects in and out of the lanes.

    Arguments:
        fun: the function, bound method or ``Module``; omit it to get a decorator.
        in_axes, out_axes, axis_name, axis_size, spmd_axis_name: as in ``jax.vmap``.
        state_in_axes, state_out_axes, unexpected_out_state_mapping: see
            :class:`StatefulMapping`.

    Returns:
        A :class:`StatefulMapping`, compiled with ``jax.jit`` on first call.

    Example:
        >>> import jax.numpy as jnp
        >>> vmap(lambda x: x * 2)(jnp.arange(3.0)).tolist()
        [0.0, 2.0, 4.0]
    """
    mapping_fn = jax.vmap
    if spmd_axis_name is not None:
        mapping_fn = _VmapWithSpmd(spmd_axis_name)
    options = dict(
        in_axes=in_axes,
        out_axes=out_axes,
        state_in_axes=state_in_axes,
        state_out_axes=state_out_axes,
        unexpected_out_state_mapping=unexpected_out_state_mapping,
        axis_name=axis_name,
        axis_size=axis_size,
        mapping_fn=mapping_fn,
        name="vmap",
    )
    if fun is MISSING:
        return lambda f: StatefulMapping(f, **options)
    return StatefulMapping(fun, **options)


class _VmapWithSpmd:
    """``jax.vmap`` with ``spmd_axis_name``, compiled like the plain one."""

    func = jax.vmap

    def __init__(self, spmd_axis_name: Any):
        self.spmd_axis_name = spmd_axis_name

    def __call__(self, fun: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
        return jax.vmap(fun, spmd_axis_name=self.spmd_axis_name, **kwargs)
