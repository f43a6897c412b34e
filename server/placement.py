"""Where the server's values live: on one process, where ``jax.device_put`` puts them; in a
``jax.distributed`` group (``server/cluster.py``), as global arrays over every device.

Every process of a group received the same host values (the leader decoded them, the
followers got them from its stream), so a global array is built from each process's own
copy: nothing moves between processes. Uploaded states and call arguments are replicated
(every device holds the whole value); the group's ``pmap`` reshards a mapped one to a lane
per device on first use (``statehost.transform._transforms._GroupPmapWrapper``), and the
state keeps that layout from then on, as on one process.

**Reading a group's results.** The leader reads an array laid out over every process
(a call's outputs, a pulled or persisted state) from its own shards and the followers'
shards, which each follower sends it on its connection to the leader (``PeerShards``,
``server/cluster.py``), rather than through ``process_allgather``: that is a collective
program over gloo (an all-gather to every device of every process, ~2x the CPU of the
whole tiny call), although only the leader reads the result.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import jax
import numpy as np

from statehost import State

__all__ = ["PeerShards", "gathered", "global_arguments", "place", "resident_shards",
           "shards", "use_peers"]


class PeerShards(Protocol):
    """How a group's processes bring their shards to the leader (``server/cluster.py``)."""

    def send(self, parts: list[list[tuple[Any, np.ndarray]]]) -> None:
        """A follower's: its shards (index, host copy) of each gathered array."""

    def receive(self) -> list[list[list[tuple[Any, np.ndarray]]]]:
        """The leader's: every follower's ``send`` for the same gather, in process order."""


#: This process's ``PeerShards`` in a group (``None``: gather with ``process_allgather``).
#: Set once, when the process joins its group, like ``jax.distributed``'s own state.
_PEERS: list[PeerShards] = []


def use_peers(peers: PeerShards | None) -> None:
    """Makes ``peers`` the way ``gathered`` reads this process's group (``None``: none)."""
    _PEERS.clear()
    if peers is not None:
        _PEERS.append(peers)


def place(value: Any) -> Any:
    """An uploaded state's value on the server's devices."""
    if jax.process_count() == 1:
        return jax.device_put(value)
    return jax.tree_util.tree_map(_global, value)


def global_arguments(args: Any) -> Any:
    """A call's host arguments as global arrays in a group (unchanged on one process):
    multi-controller JAX would read each process's copy as that process's own lanes."""
    if jax.process_count() == 1:
        return args

    def one(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray | np.generic) or (
                isinstance(leaf, jax.Array) and leaf.is_fully_addressable):
            return _global(leaf)
        return leaf

    return jax.tree_util.tree_map(one, args, is_leaf=lambda x: isinstance(x, State))


def gathered(tree: Any) -> Any:
    """``tree`` with every array this process holds only part of gathered whole.

    Every process of the group calls it for the same arrays in the same order, those laid
    out over every process: in a server group each follower sends the leader its shards
    (``use_peers``, see the module docstring); elsewhere (``tests/core``'s groups) it is
    ``process_allgather``, a collective. An array
    on the leader's devices alone (a ``pmap(devices=...)`` on some of them) is whole on
    the leader, and a follower (whose results go nowhere) takes a placeholder of its shape.
    Any other layout cannot be read by the leader: a ``ValueError`` on every process (the
    layout is the same everywhere), before any gather starts, so all fail alike.
    """
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    everywhere = set(range(jax.process_count()))
    ways = []
    for leaf in leaves:
        if not isinstance(leaf, jax.Array):
            ways.append("local")
            continue
        holders = {d.process_index for d in leaf.sharding.device_set}
        if holders == everywhere:
            ways.append("gather" if not leaf.is_fully_addressable else "local")
        elif holders == {0}:
            ways.append("local" if leaf.is_fully_addressable else "placeholder")
        else:
            raise ValueError(_MSG_ELSEWHERE.format(shape=leaf.shape, processes=sorted(holders)))
    if _PEERS and "gather" in ways:
        return jax.tree_util.tree_unflatten(treedef, _gather_by_peers(leaves, ways, _PEERS[0]))
    out = []
    for leaf, way in zip(leaves, ways, strict=True):
        if way == "gather":
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        elif way == "placeholder":
            leaf = np.zeros(leaf.shape, leaf.dtype)
        out.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, out)


def _gather_by_peers(leaves: list[Any], ways: list[str], peers: PeerShards) -> list[Any]:
    """``gathered``'s leaves read as the module docstring says: a follower sends its shards
    of every array to gather in one message (and keeps placeholders: its results go
    nowhere); the leader fills each whole array from its shards and the followers'."""
    leader = jax.process_index() == 0
    # A replicated array (a fresh upload) is whole on the leader: no follower sends it.
    ways = ["replica" if way == "gather" and leaf.sharding.is_fully_replicated else way
            for leaf, way in zip(leaves, ways, strict=True)]
    own = [_host_shards(leaf) if way == "gather" else None
           for leaf, way in zip(leaves, ways, strict=True)]
    if not leader:
        peers.send([parts for parts in own if parts is not None])
    received = peers.receive() if leader else []
    out = []
    k = 0
    for leaf, way, parts in zip(leaves, ways, own, strict=True):
        if way == "placeholder" or (way in ("gather", "replica") and not leader):
            leaf = np.zeros(leaf.shape, leaf.dtype)
        elif way == "replica":
            leaf = np.asarray(leaf.addressable_data(0))
        elif way == "gather":
            host = np.empty(leaf.shape, leaf.dtype)
            assert parts is not None
            for index, data in [*parts, *(p for sent in received for p in sent[k])]:
                host[index] = data
            leaf = host
        k += way == "gather"
        out.append(leaf)
    return out


def _host_shards(leaf: Any) -> list[tuple[Any, np.ndarray]]:
    """This process's parts of ``leaf`` (one per distinct index: replicas once)."""
    parts: dict[Any, np.ndarray] = {}
    for shard in leaf.addressable_shards:
        key = tuple((s.start, s.stop, s.step) for s in shard.index)
        if key not in parts:
            parts[key] = shard.data
    for data in parts.values():  # the copies overlap (device_get would, at ~5x the CPU
        data.copy_to_host_async()  # of its pytree handling for these few leaves)
    return [(tuple(slice(*k) for k in key), np.asarray(data)) for key, data in parts.items()]


_MSG_ELSEWHERE = (
    "an array of shape {shape} lives on devices of processes {processes} of the server's "
    "group only (a pmap with devices= on some of the group's devices), so the leader "
    "(process 0) cannot read it. Fix: map over all devices, or over process 0's only "
    "(client.devices() shows each device's process_index)."
)


def _replicated() -> Any:
    return _replicated_over(tuple(jax.devices()))


@functools.lru_cache(maxsize=8)
def _replicated_over(devices: tuple[Any, ...]) -> Any:
    """Built once per device set: a ``Mesh`` and its sharding cost ~40 us a call, and
    ``jax.devices()`` does not change while a process lives (a pure function of it)."""
    mesh = jax.sharding.Mesh(np.asarray(devices), ("lanes",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _global(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return leaf
    host = np.asarray(leaf)
    # As device_put does: 64-bit values become 32-bit ones unless jax_enable_x64.
    host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
    return jax.make_array_from_callback(host.shape, _replicated(), lambda index: host[index])


def shards(value: Any) -> list[list[int]]:
    """The ids of the devices of this process that hold a part of each leaf of ``value``."""
    return [sorted(s.device.id for s in leaf.addressable_shards)
            for leaf in jax.tree_util.tree_leaves(value) if isinstance(leaf, jax.Array)]


def resident_shards(store: Any, limit: int = 1000) -> dict[str, dict[str, Any]]:
    """Each resident state's ``shards`` on this process (health JSON of a group's
    processes: which process holds which part)."""
    out = {}
    for state_id, state in list(store._states.items())[:limit]:  # a copy: calls change it
        out[state_id] = {"shards": shards(state._value)}
    return out
