"""Sections: one pickle (protocol 5, cloudpickle) with its array data out of band.

``State`` objects inside a pickled section travel as :class:`StateRef`s, never
with their values; the receiver's ``load_state`` turns each reference into its
own ``State``. State values travel separately, as :class:`StateRecord`s (an
upload) or :class:`StateValue`s (a download). An object whose class has a
``__statehost_handle__`` method (the client's ``RemoteArray``: an array that
stays on the server) travels as a :class:`HandleRef`, and the receiver hands
back its own array.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import cloudpickle
import numpy as np

from statehost._errors import WireError, brief
from statehost._state import State

__all__ = ["HandleRef", "Section", "StateRecord", "StateRef", "StateValue", "pack", "state_ref",
           "unpack"]


class StateRef(NamedTuple):
    """How a ``State`` travels inside a pickle: identity and kind, never its value."""

    id: str
    cls: type
    name: str | None
    tag: str | None


class HandleRef(NamedTuple):
    """How an array kept on the server travels inside a pickle: its handle name only."""

    id: str


class StateRecord(NamedTuple):
    """An uploaded state value: enough to rebuild the ``State`` on the other side."""

    cls: type
    id: str
    name: str | None
    tag: str | None
    value: Any

    @classmethod
    def of(cls, state: State, value: Any) -> StateRecord:
        return cls(type(state), state.id, state.name, state.tag, value)

    def to_state(self) -> State:
        """A new ``State`` of this record's class, id, name, tag and value."""
        return self.cls.restore(self.value, id=self.id, name=self.name, tag=self.tag)


class StateValue(NamedTuple):
    """A downloaded state value."""

    id: str
    value: Any


def state_ref(state: State) -> StateRef:
    return StateRef(state.id, type(state), state.name, state.tag)


@dataclass
class Section:
    """One pickle and its out-of-band buffers.

    Built by :func:`pack` on the sending side (``states`` lists the States met);
    received sections hold views of the frame's buffers and unpickle with :meth:`load`.
    """

    payload: bytes | memoryview
    buffers: list[memoryview] = field(default_factory=list)
    states: list[State] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return memoryview(self.payload).nbytes + sum(b.nbytes for b in self.buffers)

    def load(self, load_state: Callable[[StateRef], Any] | None = None) -> Any:
        """Unpickles the section. Unpickling runs code: only call it on authenticated input."""
        return unpack([memoryview(self.payload), *self.buffers], load_state)


class _RefPickler(cloudpickle.Pickler):
    """A cloudpickle pickler that turns every ``State`` into ``state_ref(state)``."""

    def __init__(self, file: io.BytesIO, buffer_callback: Callable[[Any], Any] | None):
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self.seen: dict[str, State] = {}

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, State):
            self.seen.setdefault(obj.id, obj)
            return state_ref(obj)
        # Looked up on the type: a user object's __getattr__ must not run here.
        handle = getattr(type(obj), "__statehost_handle__", None)
        if handle is not None:
            return HandleRef(handle(obj))
        return None


# What the standard pickler writes exactly as cloudpickle's would: builtin containers and
# scalars, and numpy arrays and scalars holding no Python objects (numpy's own reducers).
_PLAIN_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes})
_PLAIN_NODES = 64  # a larger tree is checked no further: cloudpickle pickles it


def is_plain_data(obj: Any) -> bool:
    """Whether ``obj`` is plain data: tuples, lists and dicts (exactly those types) of
    Python scalars, strings, bytes and numpy arrays or scalars with no object dtype, at
    most ``_PLAIN_NODES`` objects in all.

    Such a tree holds no ``State``, no remote array and no code, so the standard C pickler
    writes the pickle cloudpickle's ``_RefPickler`` would (the same reducers), about five
    times faster: a warm call's arguments are usually this (a batch, a step number).
    """
    todo, seen = [obj], 0
    while todo:
        x = todo.pop()
        seen += 1
        if seen > _PLAIN_NODES:
            return False
        kind = type(x)
        if kind in _PLAIN_SCALARS:
            continue
        if kind is tuple or kind is list:
            todo.extend(x)
        elif kind is dict:
            todo.extend(x.keys())
            todo.extend(x.values())
        elif kind is np.ndarray or isinstance(x, np.generic):
            if x.dtype.hasobject:
                return False
        else:
            return False
    return True


def pack(obj: Any, *, refs: bool = True, code: bool = True, oob: bool = True) -> Section:
    """Pickles ``obj`` (protocol 5, cloudpickle) with array data out of band.

    Arguments:
        obj: anything cloudpickle can pickle. Convert ``jax.Array`` leaves to
            numpy first (``jax.device_get``) so their data travels out of band.
        refs: replace ``State`` objects by references (``state_ref``); when
            False, a State is pickled whole, value included.
        code: pickle with cloudpickle (functions and classes by value). With
            False, data is pickled by the standard C pickler, about twice as
            fast; cloudpickle is still used if that fails. Plain data
            (``is_plain_data``) always goes through the standard pickler.
        oob: send array data out of band; False keeps everything in one pickle
            (for payloads stored as one blob).

    Returns:
        A :class:`Section`; ``states`` holds the States met, in pickling order.
    """
    buffers: list[memoryview] = []

    def keep(buf: pickle.PickleBuffer) -> bool:
        buffers.append(buf.raw())
        return False

    file = io.BytesIO()
    if refs and code and is_plain_data(obj):  # no State, handle or code to replace or ship
        pickle.Pickler(file, protocol=5, buffer_callback=keep if oob else None).dump(obj)
        return Section(file.getvalue(), buffers)
    if refs:
        pickler = _RefPickler(file, keep if oob else None)
        pickler.dump(obj)
        return Section(file.getvalue(), buffers, list(pickler.seen.values()))
    if not code:
        try:
            pickle.Pickler(file, protocol=5, buffer_callback=keep).dump(obj)
            return Section(file.getvalue(), buffers)
        except (pickle.PicklingError, AttributeError, TypeError):
            file, buffers[:] = io.BytesIO(), []
    cloudpickle.Pickler(file, protocol=5, buffer_callback=keep).dump(obj)
    return Section(file.getvalue(), buffers)


class _RefUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, buffers: Sequence[Any], load_state: Callable[[Any], Any]):
        super().__init__(file, buffers=buffers)
        self._load_state = load_state

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, StateRef | HandleRef):
            raise WireError(
                f"statehost wire: unknown persistent reference {brief(pid)}; only StateRef "
                "and HandleRef may appear. Fix: send payloads pickled by statehost's client."
            )
        return self._load_state(pid)


def _no_states(ref: StateRef | HandleRef) -> Any:
    what = "a State" if isinstance(ref, StateRef) else "an array kept on the server"
    raise WireError(
        f"statehost wire: the payload refers to {what} ({brief(ref)}) where none may appear. "
        "Fix: send values, not State objects or remote arrays, in this message."
    )


def unpack(buffers: Sequence[memoryview], load_state: Callable[[StateRef], Any] | None = None
           ) -> Any:
    """Unpickles a section (its pickle, then its out-of-band buffers).

    ``load_state`` receives each :class:`StateRef` and returns the object to
    use in its place. Unpickling runs code: only call it on authenticated input.
    """
    payload, rest = buffers[0], buffers[1:]
    return _RefUnpickler(io.BytesIO(payload), rest, load_state or _no_states).load()
