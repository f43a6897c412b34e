"""Modules: attribute trees of states (``statehost.nn.Module``)."""

from statehost.nn._module import Module

__all__ = ["Module"]
