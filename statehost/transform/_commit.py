"""Deferred commits: a host decides when a transform's new state values are installed.

Locally, a stateful transform writes its new state values as its last step.
A server must do more before that point (copy the outputs to the host, write
a durable copy to disk) and may still fail; inside :func:`defer_writes`, a
top-level transform call leaves every ``State`` untouched and hands its new
values to the :class:`PendingWrites`, which the host commits once everything
else has succeeded, or drops.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

from statehost._state import State

__all__ = ["PendingWrites", "defer_writes", "pending_writes"]

_PENDING: contextvars.ContextVar[PendingWrites | None] = contextvars.ContextVar(
    "statehost_pending_writes", default=None
)


class PendingWrites:
    """New state values of the transform calls made inside :func:`defer_writes`.

    Reads of a state with a pending value see that value, so two calls in one
    block compose as they would with immediate writes.
    """

    def __init__(self) -> None:
        self.values: dict[State, Any] = {}

    def read(self, state: State) -> Any:
        return self.values[state] if state in self.values else state.snapshot().value

    def write(self, state: State, value: Any) -> None:
        self.values[state] = value

    @property
    def states(self) -> list[State]:
        """The states written, in the order of their first write."""
        return list(self.values)

    def commit(self) -> None:
        """Installs every pending value (each state's write count moves on by one)."""
        for state, value in self.values.items():
            state._commit(value)
        self.values.clear()


@contextlib.contextmanager
def defer_writes() -> Iterator[PendingWrites]:
    """Collects the new state values of transform calls instead of writing them.

    Example:
        >>> import jax.numpy as jnp, statehost
        >>> w = statehost.ParamState(jnp.zeros(2))
        >>> step = statehost.transform.jit(lambda: setattr(w, "value", w.value + 1))
        >>> with statehost.transform.defer_writes() as pending:
        ...     step()
        >>> (w.value.tolist(), [s is w for s in pending.states])
        ([0.0, 0.0], [True])
        >>> pending.commit(); w.value.tolist()
        [1.0, 1.0]
    """
    pending = PendingWrites()
    token = _PENDING.set(pending)
    try:
        yield pending
    finally:
        _PENDING.reset(token)


def pending_writes() -> PendingWrites | None:
    """The innermost active :class:`PendingWrites`, or ``None``."""
    return _PENDING.get()
