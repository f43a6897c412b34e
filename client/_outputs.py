"""A call's outputs on the client: what the server sent, as the local call returns them.

A local transform returns ``jax.Array``s, and so does a remote one: the server
sends each output leaf's host copy (numpy, out of band) and, in the reply
header, whether it was weakly typed (``CallReply.weak_types``, which the host
copy forgets). :func:`local_outputs` rebuilds ``jax.Array``s on this process's
default device with the server's dtype and ``weak_type``, so they print
(``Array([...], dtype=float32, weak_type=True)``), compare and promote exactly
like the local call's outputs, and like the state values a call pulls back.

This is the one place where a reply's outputs become local values: when outputs
become remote handles, the handle resolves through :func:`as_array`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from statehost._errors import WireError
from statehost.wire import CallReply

__all__ = ["as_array", "local_outputs"]

_MSG_WEAK_TYPES = (
    "statehost client: the server's CallReply lists {flags} weak_types for {leaves} output "
    "leaves. Fix: use a client and server of the same statehost version."
)


def local_outputs(reply: CallReply) -> Any:
    """The outputs of ``reply`` as the call returned them on the server: ``jax.Array``s.

    Arguments:
        reply: the decoded reply of ``POST /v1/call``.

    Returns:
        The output pytree, every array leaf a ``jax.Array`` with its dtype and weak type.
    """
    leaves, treedef = jax.tree_util.tree_flatten(reply.results.load())
    # A reply without weak_types (a server from before the field) has no weak outputs.
    weak = reply.weak_types or (False,) * len(leaves)
    if len(weak) != len(leaves):
        raise WireError(_MSG_WEAK_TYPES.format(flags=len(weak), leaves=len(leaves)))
    return jax.tree_util.tree_unflatten(
        treedef, [as_array(x, w) for x, w in zip(leaves, weak, strict=True)]
    )


def as_array(value: Any, weak_type: bool = False) -> Any:
    """A host array as a ``jax.Array`` of the same dtype; anything else unchanged.

    Arguments:
        value: a numpy array or scalar (an output leaf as the wire carries it).
        weak_type: whether the server's array was weakly typed.

    Example:
        >>> import numpy as np
        >>> as_array(np.arange(2.0, dtype=np.float32) + 0.5, weak_type=True)
        Array([0.5, 1.5], dtype=float32, weak_type=True)
    """
    if not isinstance(value, np.ndarray | np.generic):
        return value
    if _put is not None:
        array = _put(value, weak_type)
        if array is not None:
            return array
    array = jnp.asarray(value)  # half the cost of jax.device_put for small arrays
    return _weakly_typed(array) if weak_type else array


def state_array(value: Any) -> Any:
    """A state value that came back as a ``jax.Array`` on the default device, uncommitted,
    as ``jax.device_put(value)`` makes it, by ``as_array``'s faster path where it applies
    (a call that writes back 24 states spent 9 ms in ``jax.device_put`` alone)."""
    array = as_array(value)
    return jax.device_put(value) if array is value else array


def _direct_put() -> Callable[[Any, bool], jax.Array | None] | None:
    """The fast way to make an output's ``jax.Array``, or ``None`` where JAX lacks it.

    ``jnp.asarray`` of a host array dispatches a ``convert_element_type`` primitive:
    about 20 us warm, and 110-190 us of client CPU per call measured inside a tiny
    remote call on a 2-core machine (cold caches after the wait for the server),
    most of the client's per-call cost of returning ``jax.Array``s.
    ``pxla.batched_device_put`` is the step ``jnp.asarray`` and ``jax.device_put``
    end in (``jax/_src/interpreters/pxla.py``, ``_shard_np_array``): one buffer on the
    default device (``get_default_device``, so ``jax.default_device`` is honoured),
    uncommitted, about 4 us, and the aval is made weak here instead of patched after.
    Private API (jax 0.10.2), so: only for contiguous arrays of a dtype JAX keeps as is
    (anything else takes the public path), and a JAX without these names falls back to
    ``jnp.asarray`` entirely; ``tests/client/test_outputs.py`` compares both paths.
    """
    try:
        from jax._src.core import ShapedArray
        from jax._src.interpreters.pxla import batched_device_put, get_default_device
    except ImportError:
        return None
    canonical: dict[np.dtype, bool] = {}
    shardings: dict[Any, jax.sharding.SingleDeviceSharding] = {}

    def put(value: Any, weak_type: bool) -> jax.Array | None:
        host = np.asarray(value)  # a numpy scalar becomes a 0-d array
        dtype = host.dtype
        keeps = canonical.get(dtype)
        if keeps is None:
            try:
                keeps = dtype.kind != "O" and jax.dtypes.canonicalize_dtype(dtype) == dtype
            except (TypeError, ValueError):  # a dtype JAX has no arrays of
                keeps = False
            canonical[dtype] = keeps
        if not keeps or not host.flags.c_contiguous:
            return None
        device = get_default_device()
        sharding = shardings.get(device)
        if sharding is None:
            sharding = shardings[device] = jax.sharding.SingleDeviceSharding(device)
        aval = ShapedArray(host.shape, dtype, weak_type=weak_type)
        return batched_device_put(aval, sharding, [host], [device], committed=False)

    return put


_put = _direct_put()


def _weakly_typed(array: jax.Array) -> jax.Array:
    """``array`` marked weakly typed, as JAX marks the result of ``x + 0.5``.

    jax 0.10.2 has no public way to make a weakly typed array from host data:
    ``jax.lax.convert_element_type`` takes no ``weak_type`` and ``jnp.asarray`` of an
    array is never weak. This is what JAX's own unpickler does
    (``jax/_src/array.py``, ``_reconstruct_array``): give the array the weak twin of
    its aval, about 4 us and no compile. The public route, an AOT-compiled identity
    of a weak ``jax.ShapeDtypeStruct``, compiles once per shape (~12 ms here) and
    needs a cache of executables. ``tests/client/test_outputs.py`` pins the behaviour,
    so a JAX release that changes it fails there first.
    """
    array.aval = array.aval.update(weak_type=True)
    return array
