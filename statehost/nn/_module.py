"""``Module``: an attribute tree of states and sub-modules.

States and sub-modules may sit directly on attributes or inside lists, tuples
and dicts. :meth:`Module.states` walks that tree and returns every state with
its attribute path, which is what path filters (``PathContains``) match.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

from statehost._state import State, format_state
from statehost.util._filter import to_predicate

__all__ = ["Module", "state_paths"]

Path = tuple[Hashable, ...]


class Module:
    """Base class for models: assign ``State`` objects and sub-modules as attributes.

    Example:
        >>> import jax.numpy as jnp, statehost
        >>> class Affine(statehost.nn.Module):
        ...     def __init__(self, size):
        ...         super().__init__()
        ...         self.weight = statehost.ParamState(jnp.ones((size,)))
        >>> list(Affine(2).states())
        [('weight',)]
    """

    __module__ = "statehost.nn"

    def __init__(self) -> None:
        pass

    def states(self, *filters: object) -> dict[Path, State]:
        """Every state of this module and its sub-modules, keyed by attribute path.

        Arguments:
            *filters: optional filters (see ``statehost.util.filter``); a state is
                returned when any of them matches. No filter returns every state.

        Returns:
            An insertion-ordered ``dict`` from path tuple to ``State``.
        """
        found = {path: state for state, path in state_paths(self).items()}
        if not filters:
            return found
        pred = to_predicate(list(filters)) if len(filters) > 1 else to_predicate(filters[0])
        return {path: st for path, st in found.items() if pred(path, st)}

    def __repr__(self) -> str:
        return _format_node(self, indent=0, seen=set())

    def _repr_html_(self) -> str:
        """The notebook display: a table of the states (``statehost._display``)."""
        from statehost._display import module_html

        return module_html(self)


def _children(node: Any) -> Iterator[tuple[Hashable, Any]]:
    if isinstance(node, Module):
        yield from vars(node).items()
    elif isinstance(node, dict):
        yield from node.items()
    elif isinstance(node, list | tuple):
        yield from enumerate(node)


def state_paths(root: Any) -> dict[State, Path]:
    """Maps every state reachable from ``root`` to its first attribute path.

    ``root`` may be a ``Module``, a container of modules and states, or a bound
    method of a module (its ``__self__`` is walked). Anything else has no paths.
    """
    owner = getattr(root, "__self__", root)
    paths: dict[State, Path] = {}
    seen: set[int] = set()

    def walk(node: Any, path: Path) -> None:
        if isinstance(node, State):
            paths.setdefault(node, path)
            return
        if not isinstance(node, Module | dict | list | tuple) or id(node) in seen:
            return
        seen.add(id(node))
        for key, child in _children(node):
            walk(child, (*path, key))

    walk(owner, ())
    return paths


def _format_node(node: Any, indent: int, seen: set[int]) -> str:
    pad = " " * indent
    if isinstance(node, State):
        return format_state(node, indent)
    if isinstance(node, Module):
        if id(node) in seen:
            return f"{type(node).__name__}(...)"
        seen = seen | {id(node)}
        items = [
            (key, child)
            for key, child in vars(node).items()
            if _holds_state(child)
        ]
        if not items:
            return f"{type(node).__name__}()"
        body = ",\n".join(
            f"{pad}  {key}={_format_node(child, indent + 2, seen)}" for key, child in items
        )
        return f"{type(node).__name__}(\n{body}\n{pad})"
    if isinstance(node, dict | list | tuple):
        pairs = list(_children(node))
        open_, close = {dict: "{}", list: "[]"}.get(type(node), "()")
        body = ",\n".join(
            f"{pad}  {key!r}: {_format_node(child, indent + 2, seen)}"
            if isinstance(node, dict)
            else f"{pad}  {_format_node(child, indent + 2, seen)}"
            for key, child in pairs
        )
        return f"{open_}\n{body}\n{pad}{close}"
    return repr(node)


def _holds_state(node: Any) -> bool:
    if isinstance(node, State | Module):
        return True
    if isinstance(node, dict | list | tuple):
        return any(_holds_state(child) for _, child in _children(node))
    return False
