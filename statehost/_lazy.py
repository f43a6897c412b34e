"""Lazy re-exports for package ``__init__`` modules (PEP 562 module ``__getattr__``).

``import statehost`` (or ``statehost.client``, ``statehost.wire``) loads no JAX: a
name is imported from its module the first time it is used, then cached in the
package. So the ``statehost`` command starts in a fraction of a second, and a
notebook may still call ``jax.config.update`` after ``import statehost``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, namespace: dict[str, Any], exports: Mapping[str, str],
                 modules: tuple[str, ...] = ()
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to the
    module defining it; ``modules`` names public subpackages, imported on first use."""
    exports = {**exports, **{name: f"{package}.{name}" for name in modules}}

    def __getattr__(name: str) -> Any:  # noqa: N807
        where = exports.get(name)
        if where is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(where)
        if name in modules:
            namespace[name] = module
            return module
        # Every name of that module at once: importing it also set the package attribute of
        # the same name as the module (persistence.flusher) to the module itself.
        for other, home in exports.items():
            if home == where and other not in modules:
                namespace[other] = getattr(module, other)
        return namespace[name]

    def __dir__() -> list[str]:  # noqa: N807
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
