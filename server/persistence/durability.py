"""``Durability``: when a namespace's committed state values reach the disk."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Durability"]


class Durability(StrEnum):
    """A namespace's durability; its value is what settings, the database and the API spell.

    ``SYNC``: a commit is written to disk before it is acknowledged. ``INTERVAL``: by the
    background flush (``flush_interval``) and at shutdown. ``NONE``: never.

    Example:
        >>> Durability("sync") is Durability.SYNC, str(Durability.NONE), Durability.is_valid("x")
        (True, 'none', False)
    """

    SYNC = "sync"
    INTERVAL = "interval"
    NONE = "none"

    @classmethod
    def is_valid(cls, value: object) -> bool:
        """Is ``value`` one of the spellings? (``str in Durability`` raises on Python 3.11.)"""
        return isinstance(value, str) and value in cls._value2member_map_

    @classmethod
    def choices(cls) -> str:
        """``"sync, interval, none"``, for error messages."""
        return ", ".join(d.value for d in cls)
