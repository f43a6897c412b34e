"""``SyncLedger``: what this client knows of the server's copy of each state.

Per state id it records the local write count at which the server last held
the same value (``synced``), the server version that local value is based on
(``base``, sent with uploads so the server can refuse lost updates), and
whether the server holds a newer value than the local one (``stale``: written
by a ``pull=False`` call). It also remembers which callables the server has
cached (by digest) and tracks the ``State`` objects weakly, so a value that
comes back can be written into the right one.

Everything here describes one server session: :meth:`forget_server` clears it
when the session is reopened.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping

from statehost._state import State

__all__ = ["SyncLedger"]


class SyncLedger:
    def __init__(self, server: str = "") -> None:
        self.server = server  # the URL, for displays
        self._synced: dict[str, int] = {}
        self._base: dict[str, int] = {}
        self._stale: set[str] = set()
        self._digests: set[str] = set()
        self._tracked: weakref.WeakValueDictionary[str, State] = weakref.WeakValueDictionary()

    # -- states ---------------------------------------------------------------------
    def track(self, states: Iterable[State]) -> None:
        for state in states:
            self._tracked[state.id] = state

    def tracked(self, state_id: str) -> State | None:
        return self._tracked.get(state_id)

    def needs_upload(self, state: State) -> bool:
        """The server lacks this state's value, or it was set locally since."""
        return self._synced.get(state.id) != state.write_count

    def bases(self, states: Iterable[State]) -> dict[str, int | None]:
        """Each state's server version its local value is based on (``None``: new)."""
        return {s.id: self._base.get(s.id) for s in states}

    def sent(self, counts: Mapping[str, int], versions: Mapping[str, int]) -> None:
        """Values at these write counts reached the server as these versions."""
        for state_id, count in counts.items():
            self._synced[state_id] = count
            self._stale.discard(state_id)
        self._base.update({i: v for i, v in versions.items() if i in counts})

    def received(self, state: State, version: int | None) -> None:
        """``state`` now holds the server's value (of ``version``, when known)."""
        self._synced[state.id] = state.write_count
        if version is not None:
            self._base[state.id] = version
        self._stale.discard(state.id)

    def rebase(self, versions: Mapping[str, int]) -> None:
        """The server committed these versions of states whose local value is the server's
        (an asynchronous call wrote them; the local state holds its deferred value)."""
        for state_id, version in versions.items():
            if state_id in self._base or state_id in self._synced:
                self._base[state_id] = version

    def written_remotely(self, ids: Iterable[str]) -> None:
        """The server holds newer values of these states than this client."""
        self._stale.update(ids)

    def unpulled(self, state: State) -> None:
        """``state`` exists on the server but its value was not fetched (``get(pull=False)``)."""
        self._synced[state.id] = state.write_count
        self._stale.add(state.id)

    def is_stale(self, state_id: str) -> bool:
        return state_id in self._stale

    def stale_among(self, ids: Iterable[str]) -> list[str]:
        return [i for i in ids if i in self._stale]

    def forget(self, ids: Iterable[str]) -> None:
        """The server no longer has these states (deleted): upload them again when used."""
        for state_id in ids:
            self._synced.pop(state_id, None)
            self._base.pop(state_id, None)
            self._stale.discard(state_id)

    def describe_state(self, state: State) -> dict[str, str] | None:
        """What a module's notebook display shows of ``state`` (``statehost._display``)."""
        if self._tracked.get(state.id) is not state:
            return None
        if state.id in self._stale:
            sync = "newer on the server"
        elif state.id not in self._synced:
            sync = "not on the server yet"
        elif self.needs_upload(state):
            sync = "changed locally"
        else:
            sync = "in sync"
        base = self._base.get(state.id)
        return {"server": self.server, "version": "–" if base is None else str(base),
                "sync": sync}

    # -- callables --------------------------------------------------------------------
    def has_function(self, digest: str) -> bool:
        return digest in self._digests

    def function_sent(self, digest: str) -> None:
        self._digests.add(digest)

    def function_dropped(self, digest: str) -> None:
        self._digests.discard(digest)

    # -- sessions ---------------------------------------------------------------------
    def forget_server(self) -> None:
        """A new session: the server has nothing of this client's any more."""
        self._synced.clear()
        self._base.clear()
        self._stale.clear()
        self._digests.clear()
