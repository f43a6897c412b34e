"""The one validator of names: namespaces, objects and ``namespace/name`` pairs.

A name is 1-128 characters of letters, digits, ``_``, ``-`` and ``.``, and does
not start with ``.`` or ``-`` (so ``..``, NUL bytes, slashes, right-to-left
overrides and 5000-character names never reach the database, a file path or a
listing). Every route that takes a name checks it here.
"""

from __future__ import annotations

import re
from typing import Any

from statehost.server.errors import ValidationError

__all__ = ["NAME_PATTERN", "check_name", "split_name"]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
#: The rule as a regular expression (the OpenAPI document shows it on name parameters).
NAME_PATTERN = _NAME.pattern
_RULE = ("1 to 128 letters, digits, '_', '-' or '.', not starting with '.' or '-'; "
         "e.g. 'team' or 'net-v2'")


def check_name(name: Any, what: str, where: str) -> str:
    """``name`` if it is a valid namespace or object name, else a 422 naming the rule."""
    if isinstance(name, str) and _NAME.fullmatch(name):
        return name
    raise ValidationError(f"{where}: {name!r:.80} is not a valid {what} name ({_RULE}).")


def split_name(full: Any, where: str) -> tuple[str, str]:
    """``"team/net"`` -> ``("team", "net")``, or a 422 that shows the expected form."""
    parts = full.split("/") if isinstance(full, str) else []
    if len(parts) != 2 or not all(_NAME.fullmatch(p) for p in parts):
        raise ValidationError(
            f"{where}: {full!r:.80} is not a name of the form 'namespace/name' (each part "
            f"{_RULE}; e.g. 'team/net').")
    return parts[0], parts[1]
