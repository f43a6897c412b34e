"""The exception hierarchy of statehost.

::

    StatehostError                      base of every error statehost raises itself
    ├── BatchAxisError (ValueError)     a state's batch axis conflicts with the mapping
    ├── StateTraceError (RuntimeError)  states used in a way a transform cannot follow
    └── WireError (ValueError)          bytes that are not a valid statehost frame

The client and server add their own branches (``ClientError`` and below) in
their packages; they all derive from :class:`StatehostError`.
"""

from __future__ import annotations

import reprlib

__all__ = ["BatchAxisError", "StateTraceError", "StatehostError", "WireError", "brief"]


def brief(obj: object) -> str:
    """A short repr of anything a peer sent, for error messages: depth and length are
    bounded (a list nested 10^5 deep made ``repr`` raise RecursionError), and a repr
    that fails is named instead of raised."""
    try:
        return reprlib.repr(obj)
    except Exception as exc:  # a hostile or broken __repr__
        return f"<{type(obj).__name__} whose repr raised {type(exc).__name__}>"


class StatehostError(Exception):
    """Base class of every exception raised by statehost itself."""


class BatchAxisError(StatehostError, ValueError):
    """A state's batch axis conflicts with ``state_in_axes`` / ``state_out_axes``.

    Raised by ``pmap`` / ``vmap`` before any state is written, so every state
    keeps its previous value.
    """


class StateTraceError(StatehostError, RuntimeError):
    """A state was used in a way a transform cannot follow (for example a
    JAX tracer written into a ``State`` outside any statehost transform)."""


class WireError(StatehostError, ValueError):
    """Bytes that do not follow the statehost wire format (bad magic, truncated
    frame, lengths that overrun the body, a header that is not a JSON object)."""
