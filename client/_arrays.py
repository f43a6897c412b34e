"""``RemoteArray``: an output of an asynchronous remote call, kept on the server.

An asynchronous call returns at once; its outputs are ``RemoteArray``s whose
``shape``, ``dtype``, ``ndim`` and ``size`` are known at once (the first call
of the signature told the client), and whose data stays on the server. Anything
that needs the data fetches it, once (the value is cached): ``np.asarray(x)``,
``jnp.asarray(x)``, ``x.block_until_ready()``, ``float(x)`` / ``int(x)`` /
``bool(x)``, ``x[i]``, ``x.tolist()``, ``repr(x)``, arithmetic, and any
attribute of ``jax.Array`` it does not define. Passed to another remote call,
it travels as a handle: the server uses its own buffer and no bytes move.

If the call failed, every one of those raises its error (the first time it is
the failure itself, with the remote traceback; see ``client/_dispatch.py``).

``jax.tree_util`` sees a ``RemoteArray`` as a leaf, and JAX functions take it as they
take a ``jax.Array`` (``jnp.sin(x)``, ``jax.jit(f)(x)``): tracing needs only its shape
and dtype, and running fetches its value (``client/_jax_interop.py`` says how).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import numpy as np

from statehost.client._jax_interop import register
from statehost.wire import handle_name

if TYPE_CHECKING:
    import jax

    from statehost.client._dispatch import AsyncCall

__all__ = ["RemoteArray"]


class RemoteArray:
    """One output leaf of an asynchronous remote call (see the module docstring).

    Attributes:
        shape: the array's shape.
        dtype: its dtype.
        weak_type: whether JAX typed it weakly (as ``x + 0.5`` of a Python float).

    Example:
        >>> loss = step(batch)                # doctest: +SKIP
        >>> loss.shape, loss.dtype            # doctest: +SKIP
        ((8,), dtype('float32'))
        >>> float(loss.mean())                # doctest: +SKIP
    """

    __slots__ = ("_call", "_index", "shape", "dtype", "weak_type", "_value", "__weakref__")

    def __init__(self, call: AsyncCall, index: int, shape: tuple[int, ...], dtype: Any,
                 weak_type: bool = False):
        self._call = call
        self._index = index
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.weak_type = weak_type
        self._value: jax.Array | None = None

    # -- what is known at once -------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def handle(self) -> str:
        """The name the server keeps this array under."""
        return handle_name(self._call.id, self._index)

    # JAX reads these with getattr(x, name, None) when it traces or runs a program that
    # takes the array: answering them must not fetch. The server's placement is not a
    # local one, so they are None until the value is here, then the local value's.
    @property
    def sharding(self) -> Any:
        """The fetched value's sharding; ``None`` until the value was fetched."""
        return None if self._value is None else self._value.sharding

    @property
    def format(self) -> Any:
        """The fetched value's format (layout); ``None`` until the value was fetched."""
        return None if self._value is None else self._value.format

    def __statehost_handle__(self) -> str:  # statehost.wire._pickle: travels as a HandleRef
        return self.handle

    def is_ready(self) -> bool:
        """Whether the call that makes it has finished (True also when it failed)."""
        return self._call.finished

    # -- what fetches ----------------------------------------------------------------
    def _fetch(self) -> jax.Array:
        if self._value is None:
            self._value = self._call.fetch(self._index)
        return self._value

    def block_until_ready(self) -> RemoteArray:
        """Waits until the call finished (raising its error if it failed); fetches nothing."""
        self._call.wait()
        return self

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(self._fetch(), dtype=dtype)

    def __jax_array__(self) -> jax.Array:
        return self._fetch()

    def __float__(self) -> float:
        return float(self._fetch())

    def __int__(self) -> int:
        return int(self._fetch())

    def __index__(self) -> int:
        return operator.index(self._fetch())

    def __complex__(self) -> complex:
        return complex(self._fetch())

    def __bool__(self) -> bool:
        return bool(self._fetch())

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __iter__(self) -> Any:
        return iter(self._fetch())

    def __getitem__(self, index: Any) -> Any:
        return self._fetch()[index]

    def tolist(self) -> Any:
        return self._fetch().tolist()

    def item(self, *args: Any) -> Any:
        return self._fetch().item(*args)

    def __repr__(self) -> str:
        return repr(self._fetch())

    def _status(self) -> str:
        if not self._call.finished:
            return "pending"
        return "failed" if self._call.error is not None else "ready"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        # IPython's text display: no request (repr(x) fetches; a notebook shows this).
        printer.text(repr(self._value) if self._value is not None else
                     f"RemoteArray({self.dtype}{list(self.shape)}, {self._status()})")

    def _repr_html_(self) -> str:
        """The notebook display: shape, dtype and status; the value once fetched. Displaying
        sends no request: ``np.asarray(x)`` or ``print(x)`` fetches."""
        from statehost._display import html_table

        rows = [("shape", str(self.shape)), ("dtype", str(self.dtype)),
                ("status", self._status()), ("call", self._call.id)]
        if self._value is not None:
            rows.append(("value", repr(self._value)))
        return html_table(None, rows, caption="statehost RemoteArray")

    def __str__(self) -> str:
        return str(self._fetch())

    def __format__(self, spec: str) -> str:
        return format(self._fetch(), spec)

    def __getattr__(self, name: str) -> Any:
        # Only for names not defined here (sum, mean, T, astype, ...); never for privates,
        # so copy/pickle probing does not fetch.
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._fetch(), name)

    def __reduce__(self) -> Any:
        # Pickled outside a call's arguments (where it travels as a handle): the value.
        return (np.asarray, (np.asarray(self._fetch()),))


def _binary(name: str) -> Any:
    op = getattr(operator, name if name not in ("and", "or") else f"{name}_")

    def forward(self: RemoteArray, other: Any) -> Any:
        return op(self._fetch(), other._fetch() if isinstance(other, RemoteArray) else other)

    def backward(self: RemoteArray, other: Any) -> Any:
        return op(other, self._fetch())

    return forward, backward


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and",
              "or", "xor", "lshift", "rshift"):
    _fwd, _bwd = _binary(_name)
    setattr(RemoteArray, f"__{_name}__", _fwd)
    setattr(RemoteArray, f"__r{_name}__", _bwd)
for _name in ("lt", "le", "eq", "ne", "gt", "ge"):
    setattr(RemoteArray, f"__{_name}__", _binary(_name)[0])
for _name in ("neg", "pos", "abs", "invert"):
    setattr(RemoteArray, f"__{_name}__",
            (lambda op: lambda self: op(self._fetch()))(getattr(operator, _name)))
RemoteArray.__hash__ = None  # type: ignore[assignment]  # as jax.Array: unhashable
register(RemoteArray)
