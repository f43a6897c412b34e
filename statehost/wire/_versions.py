"""Which versions a peer speaks, and which of them must agree for pickles to travel."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
from collections.abc import Mapping
from typing import Any

import cloudpickle

__all__ = ["PROTOCOL", "local_versions", "version_problems"]

# 2: typed messages (StateRef/StateRecord named tuples, call ids, error kinds by name).
PROTOCOL = 2


def local_versions() -> dict[str, Any]:
    """The versions this process speaks: protocol, Python, jax, cloudpickle, statehost.

    jax's comes from its installed metadata, so asking (``statehost doctor``) loads no JAX.
    Every frame carries them: they are read once per process (a metadata read costs
    about 1 ms, which made a tiny remote call 1.1 ms slower when done per frame).
    """
    return dict(_read_versions())


@functools.cache
def _read_versions() -> dict[str, Any]:
    from statehost import __version__

    return {
        "protocol": PROTOCOL,
        "python": ".".join(platform.python_version_tuple()[:2]),
        "jax": importlib.metadata.version("jax"),
        "cloudpickle": cloudpickle.__version__,
        "statehost": __version__,
    }


def _part(version: Any, n: int) -> str:
    return ".".join(str(version).split(".")[:n])


# What must agree for pickles to travel: (name, how many version components).
_MUST_MATCH = (("protocol", 1), ("python", 2), ("cloudpickle", 1), ("jax", 2))


def version_problems(
    mine: Mapping[str, Any], theirs: Mapping[str, Any], *, me: str, them: str
) -> list[str]:
    """Lines naming each version that must match but does not (empty when compatible).

    Python minor, cloudpickle major, jax minor and the protocol must agree:
    pickled code and arrays do not survive a change of any of them.
    """
    problems = []
    for name, n in _MUST_MATCH:
        a, b = _part(mine.get(name, "?"), n), _part(theirs.get(name, "?"), n)
        if a != b:
            problems.append(
                f"{name}: {me} has {mine.get(name, 'unknown')}, "
                f"{them} has {theirs.get(name, 'unknown')}"
            )
    return problems
