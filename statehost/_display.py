"""Notebook displays (``_repr_html_``) of modules and transforms, and the tracker protocol.

A displayed object shows only what this process already holds: rendering never sends a
request or reads a device buffer (a state's value shows by shape and dtype, not content).

What a ``State`` alone does not know (the version of its copy on a server, whether the
local value is in sync with it) comes from *trackers*: objects with a
``describe_state(state)`` method, registered with :func:`add_tracker` and held weakly
(the client registers the ledger of each connection; the core never imports the client).
"""

from __future__ import annotations

import html
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from statehost._state import State

__all__ = ["StateTracker", "add_tracker", "html_table", "module_html", "remote_status",
           "state_row"]

# Weakly held: a tracker lives as long as its owner (a client's connection) keeps it.
_TRACKERS: weakref.WeakSet[Any] = weakref.WeakSet()


class StateTracker(Protocol):
    def describe_state(self, state: State) -> dict[str, str] | None:
        """What it knows of ``state`` (``"server"``, ``"version"``, ``"sync"``), or ``None``
        when it does not track it."""


def add_tracker(tracker: StateTracker) -> None:
    """Lets module displays ask ``tracker`` about states (held weakly)."""
    _TRACKERS.add(tracker)


def remote_status(state: State) -> dict[str, str] | None:
    """The first tracker's description of ``state``, or ``None``."""
    for tracker in list(_TRACKERS):
        found = tracker.describe_state(state)
        if found is not None:
            return found
    return None


def html_table(headers: Sequence[str] | None, rows: Iterable[Sequence[Any]],
               caption: str = "") -> str:
    """A small HTML table; every cell is escaped text."""
    parts = ['<table class="statehost">']
    if caption:
        parts.append(f"<caption style=\"text-align:left\">{html.escape(caption)}</caption>")
    if headers:
        parts.append("<thead><tr>" + "".join(
            f"<th style=\"text-align:left\">{html.escape(h)}</th>" for h in headers)
            + "</tr></thead>")
    parts.append("<tbody>")
    for row in rows:
        parts.append("<tr>" + "".join(
            f"<td style=\"text-align:left\">{html.escape(str(c))}</td>" for c in row) + "</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    return ""  # unreachable


def state_row(path: str, state: State) -> list[str]:
    """path, type, shape, dtype, bytes, devices, server version, sync: from what is here."""
    import jax

    leaves = [a for a in jax.tree_util.tree_leaves(state.aval) if hasattr(a, "dtype")]
    shapes = ", ".join(str(tuple(a.shape)) for a in leaves)
    dtypes = ", ".join(str(a.dtype) for a in leaves)
    nbytes = sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
                 for a in leaves)
    if state.is_deferred:
        devices = "on the server (not fetched)"
    else:
        found: set[str] = set()
        for leaf in _leaves(state):
            for device in getattr(leaf, "devices", lambda: ())():
                found.add(f"{device.platform}:{device.id}")
        devices = ", ".join(sorted(found)) or "host"
    remote = remote_status(state) or {}
    return [path, type(state).__name__, shapes, dtypes, _size(nbytes), devices,
            remote.get("version", "–"), remote.get("sync", "local only")]


def _leaves(state: State) -> list[Any]:
    import jax

    return jax.tree_util.tree_leaves(state._value)


STATE_HEADERS = ("path", "type", "shape", "dtype", "bytes", "devices", "server version",
                 "sync")


def module_html(module: Any) -> str:
    """A module's states as a table (see :func:`state_row`)."""
    rows = [state_row(".".join(map(str, path)) or "(root)", state)
            for path, state in module.states().items()]
    return html_table(STATE_HEADERS, rows,
                      caption=f"{type(module).__name__}: {len(rows)} state(s)")
