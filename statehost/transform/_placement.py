"""``Placement``: where a stateful transform's calls run, when not in this process.

``pmap``, ``vmap``, ``jit`` and ``StatefulMapping`` build transforms that run
here. ``client.pmap`` and friends build the very same objects and *place* them
on a server: the type, the attributes the seed prints and the wrap-time checks
stay those of the local transform (as ``jax.jit`` returns one type whatever
the device), and each call goes to the placement instead. A placement is not
pickled: a transform unpickled elsewhere runs where it lands, which is how the
server runs the transform a client shipped.

The core defines the protocol only; it never knows the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from statehost.transform._stateful import StatefulCall

__all__ = ["Placement", "place"]

T = TypeVar("T", bound="StatefulCall")


@runtime_checkable
class Placement(Protocol):
    """Runs the calls of a transform somewhere else (``statehost.client.RemotePlacement``).

    ``run`` receives the transform and the call's arguments and returns its
    outputs; it commits the transform's states itself, as a local call does.
    """

    def run(self, transform: StatefulCall, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> Any: ...


def place(transform: T, placement: Placement | None) -> T:
    """Makes ``transform`` run its calls through ``placement`` (``None``: in this process).

    Arguments:
        transform: a ``StatefulMapping`` or ``StatefulFunction``.
        placement: an object with ``run(transform, args, kwargs)``, or ``None``.

    Returns:
        ``transform`` itself, now placed.

    Example:
        >>> import jax.numpy as jnp
        >>> from statehost.transform import jit
        >>> class Here:
        ...     def run(self, transform, args, kwargs):
        ...         return "ran elsewhere"
        >>> f = place(jit(lambda x: x + 1), Here())
        >>> f(jnp.ones(2))
        'ran elsewhere'
        >>> float(place(f, None)(1.0))
        2.0
    """
    if placement is not None and not isinstance(placement, Placement):
        raise TypeError(
            f"statehost.transform place(): the placement must have a "
            f"run(transform, args, kwargs) method; got {type(placement).__name__}."
        )
    transform._placement = placement
    return transform
