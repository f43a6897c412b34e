"""State filters: ``OfType``, ``WithTag``, ``PathContains``, ``Any``, ``All``, ``Not``, ..."""

from statehost.util._filter import (
    All,
    Any,
    Everything,
    Filter,
    Not,
    Nothing,
    OfType,
    PathContains,
    WithTag,
    to_predicate,
)

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
