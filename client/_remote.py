"""``RemoteMapping``: a local transform whose calls run on the server.

It wraps the very ``StatefulMapping`` / ``StatefulFunction`` that the local
``pmap`` / ``vmap`` / ``jit`` build (so arguments are checked exactly as
locally), pickles it once with its states as references, and hands each call
to the client.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from statehost._state import State
from statehost._wire import Section, pack

if TYPE_CHECKING:
    from statehost.client._client import Client

__all__ = ["RemoteDevice", "RemoteMapping"]


@dataclass(frozen=True)
class RemoteDevice:
    """A device of the server, usable as ``devices=`` of ``client.pmap``.

    Only ``platform`` and ``id`` travel; the server maps them back to its own
    ``jax.Device`` objects.
    """

    id: int
    platform: str
    kind: str
    memory: int | None = None

    def __repr__(self) -> str:
        return f"RemoteDevice(id={self.id}, platform={self.platform!r}, kind={self.kind!r})"


@dataclass
class _Packed:
    section: Section
    digest: str
    states: list[State]


class RemoteMapping:
    """Calls ``transform`` on the server of ``client``; see ``Client.pmap``.

    The transform is pickled at its first call and that pickle is reused, as
    ``jax.jit`` keeps its first trace: build a new mapping to ship changed code.
    """

    def __init__(self, client: Client, transform: Any, *, pull: bool = True):
        self._client = client
        self._transform = transform
        self._packed: _Packed | None = None
        self.pull = bool(pull)
        functools.update_wrapper(self, transform, updated=())

    @property
    def transform(self) -> Any:
        """The local transform this mapping ships (a ``StatefulMapping`` or ``StatefulFunction``)."""
        return self._transform

    def packed(self) -> _Packed:
        if self._packed is None:
            section = pack(self._transform)
            digest = hashlib.sha256(section.payload).hexdigest()
            self._packed = _Packed(section, digest, section.states)
        return self._packed

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._transform, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._client._call(self, args, kwargs)

    def __repr__(self) -> str:
        return f"Remote({self._transform!r} on {self._client.url}, pull={self.pull})"
