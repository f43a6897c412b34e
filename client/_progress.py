"""Progress bars for large transfers: uploads and downloads of 64 MiB or more.

A ``put``, ``get``, ``push``, ``pull`` or a call whose frame (or answer) is at least
:data:`THRESHOLD` bytes shows a tqdm bar of the bytes moved: ``tqdm.auto`` in a notebook
that has ipywidgets, plain text otherwise (tqdm comes with ``statehost[client]``;
``statehost[notebook]`` adds ipywidgets). Bars are off with ``connect(progress=False)``
or ``STATEHOST_PROGRESS=0``, and never shown when stderr is not a terminal and this is
not a notebook (a script's log stays clean).

Uploads are wrapped where the frame is cut into chunks (``Http.frame``). Downloads are
read by the frame transport, which learns the size only from the answer's head: the
request's description travels to it in :data:`DOWNLOAD` (a context variable, so threads
and other requests never see it), and the transport reads the body through
:func:`receiving`.
"""

from __future__ import annotations

import contextvars
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["DOWNLOAD", "THRESHOLD", "bar_class", "enabled", "receiving", "uploading"]

THRESHOLD = 64 * 2**20

#: What is being downloaded now ("GET team/net"), or ``None``: no bar for this request.
DOWNLOAD: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "statehost_download", default=None)


def in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return type(shell).__name__ == "ZMQInteractiveShell"


def enabled(progress: bool) -> bool:
    """Whether to show bars: asked for, not turned off by ``STATEHOST_PROGRESS``, and
    somewhere a person sees them (a terminal's stderr, or a notebook)."""
    if not progress or os.environ.get("STATEHOST_PROGRESS", "1").strip().lower() in (
            "0", "false", "no", "off"):
        return False
    stderr = sys.stderr
    return in_notebook() or bool(stderr is not None and getattr(stderr, "isatty",
                                                                lambda: False)())


def bar_class() -> Any:
    """``tqdm.auto.tqdm`` in a notebook that has ipywidgets, else the plain-text ``tqdm``
    (``tqdm.auto`` without ipywidgets warns, then falls back to text anyway)."""
    if in_notebook():
        try:
            import ipywidgets  # noqa: F401
        except ImportError:
            pass
        else:
            from tqdm.auto import tqdm as auto

            return auto
    from tqdm import tqdm

    return tqdm


def _bar(total: int, desc: str) -> Any:
    try:
        cls = bar_class()
    except ImportError:  # tqdm is optional: no bar
        return None
    return cls(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
               dynamic_ncols=True, leave=False)


def uploading(chunks: Iterable[Any], nbytes: int, desc: str) -> Iterator[Any]:
    """``chunks``, advancing a bar of ``nbytes`` as each one is handed to the socket."""
    bar = _bar(nbytes, desc)
    try:
        for chunk in chunks:
            yield chunk
            if bar is not None:
                bar.update(len(memoryview(chunk).cast("B")))
    finally:
        if bar is not None:
            bar.close()


def receiving(nbytes: int, read: Callable[[Callable[[int], None]], Any]) -> Any:
    """Runs ``read(advance)``, a body read of ``nbytes`` that calls ``advance(n)`` as bytes
    arrive, with a bar when a download is described in :data:`DOWNLOAD` and big enough."""
    desc = DOWNLOAD.get()
    bar = _bar(nbytes, desc) if desc is not None and nbytes >= THRESHOLD else None
    if bar is None:
        return read(lambda n: None)
    try:
        return read(bar.update)
    finally:
        bar.close()
