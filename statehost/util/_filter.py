"""Predicates over ``(path, state)`` that select states for the transforms.

A filter is called as ``filter(path, state)`` where ``path`` is the state's
attribute path inside the module being transformed (a tuple such as
``("layers", 0, "weight")``) and returns ``True`` when the state is selected.
Anywhere a filter is accepted, these shorthands work too (see :func:`to_predicate`):
a ``State`` subclass, a tag string, ``...`` (everything), ``None`` (nothing),
a list or tuple (any of its items), or a list of ``State`` instances.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

__all__ = [
    "All",
    "Any",
    "Everything",
    "Filter",
    "Not",
    "Nothing",
    "OfType",
    "PathContains",
    "WithTag",
    "to_predicate",
]

Path = tuple[Hashable, ...]
builtins_type = type  # the name `type` is shadowed by OfType's keyword
Predicate = Callable[[Path, object], bool]

_MSG_BAD_FILTER = (
    "statehost.util.filter: cannot use {value!r} (type {type}) as a state filter. Use one of: "
    "(1) a State subclass, e.g. statehost.ParamState; (2) a tag string; (3) ... for every state; "
    "(4) a filter object such as OfType(statehost.ParamState) or PathContains('weight'); "
    "(5) a list of those (any of them matches) or a list of State instances."
)


class Filter:
    """Base class: subclasses implement ``__call__(path, state) -> bool``."""

    __slots__ = ()

    def __call__(self, path: Path, state: object) -> bool:
        raise NotImplementedError

    def _key(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key()))

    def __getstate__(self) -> tuple:
        return self._key()

    def __setstate__(self, key: tuple) -> None:
        for name, value in zip(self.__slots__, key, strict=True):
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(v) for v in self._key())})"


class OfType(Filter):
    """Selects states that are instances of ``type`` (subclasses included).

    Example:
        >>> import jax.numpy as jnp, statehost
        >>> OfType(statehost.ParamState)((), statehost.ParamState(jnp.zeros(1)))
        True
    """

    __slots__ = ("type",)

    def __init__(self, type: type):  # noqa: A002 - the seed's keyword
        if not isinstance(type, builtins_type):
            raise TypeError(f"OfType(type=...): expected a class, got {type!r}.")
        self.type = type

    def __call__(self, path: Path, state: object) -> bool:
        return isinstance(state, self.type)


class WithTag(Filter):
    """Selects states whose ``tag`` equals ``tag``."""

    __slots__ = ("tag",)

    def __init__(self, tag: str):
        self.tag = tag

    def __call__(self, path: Path, state: object) -> bool:
        return getattr(state, "tag", None) == self.tag


class PathContains(Filter):
    """Selects states whose attribute path contains ``key`` as one component.

    Example:
        >>> PathContains("encoder")(("encoder", "weight"), None)
        True
    """

    __slots__ = ("key",)

    def __init__(self, key: Hashable):
        self.key = key

    def __call__(self, path: Path, state: object) -> bool:
        return self.key in path


class _StateIs(Filter):
    """Selects exactly the given ``State`` objects (by identity)."""

    __slots__ = ("ids",)

    def __init__(self, states: tuple):
        self.ids = frozenset(s.id for s in states)

    def __call__(self, path: Path, state: object) -> bool:
        return getattr(state, "id", None) in self.ids

    def __repr__(self) -> str:
        return f"StateIs({len(self.ids)} states)"


class Any(Filter):  # noqa: A001 - the seed's name
    """Selects states matched by at least one of ``filters``."""

    __slots__ = ("filters",)

    def __init__(self, *filters: object):
        self.filters = tuple(to_predicate(f) for f in filters)

    def __call__(self, path: Path, state: object) -> bool:
        return any(f(path, state) for f in self.filters)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(f) for f in self.filters)})"


class All(Filter):
    """Selects states matched by every one of ``filters``."""

    __slots__ = ("filters",)

    def __init__(self, *filters: object):
        self.filters = tuple(to_predicate(f) for f in filters)

    def __call__(self, path: Path, state: object) -> bool:
        return all(f(path, state) for f in self.filters)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(f) for f in self.filters)})"


class Not(Filter):
    """Selects states that ``filter`` does not select."""

    __slots__ = ("filter",)

    def __init__(self, filter: object):  # noqa: A002
        self.filter = to_predicate(filter)

    def __call__(self, path: Path, state: object) -> bool:
        return not self.filter(path, state)


class Everything(Filter):
    """Selects every state."""

    __slots__ = ()

    def __call__(self, path: Path, state: object) -> bool:
        return True


class Nothing(Filter):
    """Selects no state."""

    __slots__ = ()

    def __call__(self, path: Path, state: object) -> bool:
        return False


def to_predicate(value: object) -> Predicate:
    """Turns any accepted filter shorthand into a predicate ``(path, state) -> bool``.

    Arguments:
        value: a filter, a ``State`` subclass, a tag string, ``...``, ``True``,
            ``None``, ``False``, a list/tuple of those, or of ``State`` instances.

    Returns:
        A hashable predicate.

    Example:
        >>> import statehost
        >>> to_predicate(statehost.ParamState)
        OfType(<class 'statehost.ParamState'>)
    """
    from statehost._state import State

    if isinstance(value, Filter):
        return value
    if value is Ellipsis or value is True:
        return Everything()
    if value is None or value is False:
        return Nothing()
    if isinstance(value, builtins_type):
        return OfType(value)
    if isinstance(value, str):
        return WithTag(value)
    if isinstance(value, list | tuple | set | frozenset):
        items = list(value)
        states = tuple(v for v in items if isinstance(v, State))
        others = [v for v in items if not isinstance(v, State)]
        parts = ([_StateIs(states)] if states else []) + [to_predicate(v) for v in others]
        return parts[0] if len(parts) == 1 else Any(*parts)
    if isinstance(value, State):
        return _StateIs((value,))
    if callable(value):
        return value  # a user predicate (path, state) -> bool
    raise TypeError(_MSG_BAD_FILTER.format(value=value, type=type(value).__name__))
