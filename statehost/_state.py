"""``State`` and its kinds, and the trace that records state reads and writes.

A ``State`` is a mutable box around a value (an array or a pytree of arrays)
with a stable identity. Outside any transform, ``state.value`` is a plain
attribute. Inside a statehost transform, reads and writes go to the active
:class:`StateTrace`, which hands out traced values and records what the
function read and wrote; the ``State`` object itself is only written after the
whole transform succeeded.
"""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from statehost._errors import StateTraceError

__all__ = [
    "HiddenState",
    "LongTermState",
    "ParamState",
    "ShortTermState",
    "State",
    "StateSnapshot",
    "StateTrace",
]

PyTree = Any

_MSG_TRACER_LEAK = (
    "{state} was written with a JAX tracer outside any statehost transform. "
    "This happens when a function that writes states runs under a plain jax.jit / "
    "jax.vmap / jax.pmap: the traced value would leak out of its trace. Fix: wrap the "
    "function with statehost.transform.jit / vmap / pmap, which pass states in and out "
    "of the traced function for you."
)

# The innermost active trace, or None outside any transform. A ContextVar keeps
# threads (the server runs calls on worker threads) and async tasks apart.
_ACTIVE_TRACE: contextvars.ContextVar[StateTrace | None] = contextvars.ContextVar(
    "statehost_state_trace", default=None
)


class State:
    """A mutable value with a stable identity, visible to statehost transforms.

    Arguments:
        value: an array, a scalar or a pytree of arrays.
        name: an optional human-readable name (shown in reprs and errors).
        tag: an optional tag string, matched by ``statehost.util.filter.WithTag``.

    Example:
        >>> import jax.numpy as jnp, statehost
        >>> w = statehost.ParamState(jnp.zeros(3), name="w")
        >>> w.value = w.value + 1
        >>> w.value.tolist()
        [1.0, 1.0, 1.0]
    """

    __module__ = "statehost"
    __slots__ = ("_value", "_id", "name", "tag", "_writes", "__weakref__")

    def __init__(self, value: PyTree, *, name: str | None = None, tag: str | None = None):
        self._value = value
        self._id = uuid.uuid4().hex
        self.name = name
        self.tag = tag
        self._writes = 0
        trace = _ACTIVE_TRACE.get()
        if trace is not None:
            trace.adopt(self)

    # -- identity -------------------------------------------------------------
    @property
    def id(self) -> str:
        """A uuid4 hex string made at creation and kept through pickling."""
        return self._id

    @property
    def write_count(self) -> int:
        """How many times ``value`` was assigned outside a trace (used to sync)."""
        return self._writes

    # -- value ----------------------------------------------------------------
    @property
    def value(self) -> PyTree:
        trace = _ACTIVE_TRACE.get()
        if trace is None:
            return self._value
        return trace.read(self)

    @value.setter
    def value(self, new: PyTree) -> None:
        trace = _ACTIVE_TRACE.get()
        if trace is None:
            self._set_checked(new)
        else:
            trace.write(self, new)

    def _set_checked(self, new: PyTree) -> None:
        for leaf in jax.tree_util.tree_leaves(new):
            if isinstance(leaf, jax.core.Tracer):
                raise StateTraceError(_MSG_TRACER_LEAK.format(state=self._label()))
        self._value = new
        self._writes += 1

    def _commit(self, new: PyTree) -> None:
        """Write a value computed by a transform (known to be concrete)."""
        self._value = new
        self._writes += 1

    # -- for hosts that stage and undo values (the server) ---------------------
    @classmethod
    def restore(cls, value: PyTree, *, id: str, name: str | None = None,
                tag: str | None = None) -> State:
        """A state of this class with a given identity, as unpickling rebuilds one.

        Example:
            >>> import statehost
            >>> w = statehost.ParamState.restore(1.0, id="0" * 32, name="w")
            >>> (w.id, w.value, w.write_count)
            ('00000000000000000000000000000000', 1.0, 0)
        """
        state = cls.__new__(cls)
        state.__setstate__({"value": value, "id": id, "name": name, "tag": tag})
        return state

    def snapshot(self) -> StateSnapshot:
        """The current value and write count, for :meth:`revert`."""
        return StateSnapshot(self._value, self._writes)

    def revert(self, snapshot: StateSnapshot) -> None:
        """Puts back the value and write count of ``snapshot`` (undoes writes since)."""
        self._value, self._writes = snapshot.value, snapshot.writes

    # -- pickling -------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"value": self._value, "id": self._id, "name": self.name, "tag": self.tag}

    def __deepcopy__(self, memo: dict[int, Any]) -> State:
        """A deep copy is a different state: same value and kind, a new ``id``."""
        import copy

        twin = copy.copy(self)
        twin._value = copy.deepcopy(self._value, memo)
        twin._id = uuid.uuid4().hex
        twin._writes = 0
        return twin

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._value = state["value"]
        self._id = state["id"]
        self.name = state["name"]
        self.tag = state["tag"]
        self._writes = 0

    # -- display --------------------------------------------------------------
    def _label(self) -> str:
        kind = f"{type(self).__module__}.{type(self).__qualname__}"
        return f"{kind}(name={self.name!r})" if self.name else kind

    def __repr__(self) -> str:
        return format_state(self, indent=0)


class StateSnapshot(NamedTuple):
    """A state's value and write count at one moment (see :meth:`State.snapshot`)."""

    value: PyTree
    writes: int


class ParamState(State):
    """A trainable parameter (weights, biases)."""

    __module__ = "statehost"
    __slots__ = ()


class ShortTermState(State):
    """A short-lived variable reset between trials (membrane potential, ...)."""

    __module__ = "statehost"
    __slots__ = ()


class LongTermState(State):
    """A variable that persists across trials (running averages, counters)."""

    __module__ = "statehost"
    __slots__ = ()


class HiddenState(State):
    """A recurrent hidden variable of a dynamical system."""

    __module__ = "statehost"
    __slots__ = ()


# ---------------------------------------------------------------------------
# Display
# ---------------------------------------------------------------------------

def _describe_leaf(x: Any) -> str:
    """``ShapedArray(float32[2,4])`` for an array: its dtype and shape, never its values
    (the seed's text; a state's values are one ``state.value`` away)."""
    if isinstance(x, jax.core.Tracer) or not hasattr(x, "shape"):
        if hasattr(x, "aval"):
            return f"ShapedArray({x.aval.str_short()})"
        return repr(x)
    dims = ",".join(str(d) for d in x.shape)
    # np.dtype() rejects JAX's extended dtypes, such as the key<fry> of jax.random.key.
    is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    dtype = str(x.dtype) if is_key else np.dtype(x.dtype).name
    return f"ShapedArray({dtype}[{dims}])"


def format_state(state: State, indent: int) -> str:
    """``ParamState(\\n  value=ShapedArray(float32[2,4])\\n)`` at ``indent``."""
    pad = " " * indent
    leaves = jax.tree_util.tree_leaves(state._value)
    treedef = jax.tree_util.tree_structure(state._value)
    if treedef.num_leaves == 1 and treedef.num_nodes == 1:
        body = _describe_leaf(state._value)
    else:
        shown = jax.tree_util.tree_unflatten(treedef, [_describe_leaf(x) for x in leaves])
        body = repr(shown).replace("'", "")
    fields = [f"value={body}"]
    fields += [f"{key}={val!r}" for key, val in (("name", state.name), ("tag", state.tag)) if val]
    inner = f",\n{pad}  ".join(fields)
    return f"{type(state).__name__}(\n{pad}  {inner}\n{pad})"


# ---------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------

class StateTrace:
    """Records the states a function reads and writes while a transform traces it.

    Arguments:
        on_first_read: called with a state the first time the traced function
            reads it (and has not written it before); returns the value the
            function sees. Transforms use it to hand out traced inputs.

    The trace never touches ``State._value``: the current value of every state
    seen lives in :attr:`values` until the transform commits it.
    """

    __slots__ = (
        "values", "read_order", "write_order", "_written", "_on_first_read", "_local", "_token"
    )

    def __init__(self, on_first_read: Callable[[State], PyTree]):
        self.values: dict[State, PyTree] = {}
        self.read_order: list[State] = []
        self.write_order: list[State] = []
        self._written: set[State] = set()
        self._on_first_read = on_first_read
        self._local: set[int] = set()
        self._token: contextvars.Token | None = None

    def adopt(self, state: State) -> None:
        """States created inside the traced function stay private to it."""
        self._local.add(id(state))

    def read(self, state: State) -> PyTree:
        if id(state) in self._local:
            return state._value
        try:
            return self.values[state]
        except KeyError:
            value = self._on_first_read(state)
            self.values[state] = value
            self.read_order.append(state)
            return value

    def write(self, state: State, value: PyTree) -> None:
        if id(state) in self._local:
            state._value = value
            return
        if state not in self._written:
            self._written.add(state)
            self.write_order.append(state)
        self.values[state] = value

    def __enter__(self) -> StateTrace:
        self._token = _ACTIVE_TRACE.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _ACTIVE_TRACE.reset(self._token)
        self._token = None


def active_trace() -> StateTrace | None:
    """The innermost active :class:`StateTrace`, or ``None`` outside transforms."""
    return _ACTIVE_TRACE.get()
