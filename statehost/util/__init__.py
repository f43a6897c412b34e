"""Utilities of the public API: ``statehost.util.filter``."""

from statehost.util import filter

__all__ = ["filter"]
