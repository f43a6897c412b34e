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
    array = jnp.asarray(value)  # half the cost of jax.device_put for small arrays
    return _weakly_typed(array) if weak_type else array


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
