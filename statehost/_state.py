"""``State`` and its kinds, and the trace that records state reads and writes.

A ``State`` is a mutable box around a value (an array or a pytree of arrays)
with a stable identity. Outside any transform, ``state.value`` is a plain
attribute, or a :class:`DeferredValue` that resolves on first read (a value
that lives elsewhere, such as on a statehost server, until it is needed).
Inside a statehost transform, reads and writes go to the active
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
    "DeferredValue",
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


class DeferredValue:
    """A state value that is not here yet: it is fetched the first time it is read.

    Whoever makes one (statehost's client, for the state values an asynchronous
    remote call wrote) subclasses it and implements :meth:`resolve`. The core
    never imports that code; it only keeps the contract:

    - ``state.value`` (outside a transform) calls ``resolve()`` once, keeps the
      result in place of the deferred value (without counting it as a write: the
      value is the one the state already had, only fetched) and returns it;
    - every transform reads states through ``state.value``'s path, so a function
      never sees a deferred value: it is resolved before tracing;
    - ``repr(state)`` shows :attr:`aval` (shapes and dtypes) and resolves nothing;
    - pickling and ``copy.deepcopy`` resolve it (a copy carries the real value);
    - :meth:`State.is_deferred` and :meth:`State.aval` let a host look without fetching.

    An exception from ``resolve`` propagates to the reader, and the deferred value
    stays in place, so the next read tries again (the client raises a failed call's
    error that way, at the point that reads its result).

    Attributes:
        aval: the value's structure as a pytree of ``jax.ShapeDtypeStruct``.

    Example:
        >>> import jax, jax.numpy as jnp, statehost
        >>> class Later(statehost.DeferredValue):
        ...     def resolve(self):
        ...         return jnp.ones(2)
        >>> w = statehost.State(Later(jax.ShapeDtypeStruct((2,), jnp.float32)))
        >>> w.is_deferred
        True
        >>> w.value.tolist(), w.is_deferred, w.write_count
        ([1.0, 1.0], False, 0)
    """

    __slots__ = ("aval",)

    def __init__(self, aval: PyTree):
        self.aval = aval

    def resolve(self) -> PyTree:
        """The value itself (fetches it). Called at most once per successful read."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.aval})"


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
            return self._resolved()
        return trace.read(self)

    def _resolved(self) -> PyTree:
        """The value, a :class:`DeferredValue` fetched first (not counted as a write)."""
        deferred = self._value
        if not isinstance(deferred, DeferredValue):
            return deferred
        value = deferred.resolve()
        if self._value is deferred:  # not replaced while it was fetched
            self._value = value
        return value

    @property
    def is_deferred(self) -> bool:
        """Whether the value is a :class:`DeferredValue` not fetched yet."""
        return isinstance(self._value, DeferredValue)

    @property
    def aval(self) -> PyTree:
        """The value's shapes and dtypes (``jax.ShapeDtypeStruct``s), fetching nothing."""
        value = self._value
        if isinstance(value, DeferredValue):
            return value.aval
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.result_type(x))
            if hasattr(x, "dtype") or isinstance(x, int | float | complex | bool) else x,
            value)

    def defer(self, deferred: DeferredValue) -> None:
        """Sets a value that resolves on first read; counts as a write, like ``value =``."""
        if not isinstance(deferred, DeferredValue):
            raise TypeError(f"{self._label()}.defer: expected a statehost.DeferredValue, got "
                            f"{type(deferred).__name__}. Use state.value = ... for a value.")
        self._value = deferred
        self._writes += 1

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
        return {"value": self._resolved(), "id": self._id, "name": self.name, "tag": self.tag}

    def __deepcopy__(self, memo: dict[int, Any]) -> State:
        """A deep copy is a different state: same value and kind, a new ``id``."""
        import copy

        twin = copy.copy(self)
        twin._value = copy.deepcopy(self._resolved(), memo)
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
    value = state.aval if state.is_deferred else state._value  # a repr fetches nothing
    leaves = jax.tree_util.tree_leaves(value)
    treedef = jax.tree_util.tree_structure(value)
    if treedef.num_leaves == 1 and treedef.num_nodes == 1:
        body = _describe_leaf(value)
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
