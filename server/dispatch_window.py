"""``DispatchWindow``: the server's devices run at most a few programs behind it.

JAX dispatches a program and returns before the devices run it, and so does the server:
a call commits its new state values (arrays still being computed) and answers, and an
asynchronous client sends the next call at once. Left alone, a client whose programs take
longer than the server takes to dispatch them (any real training step) queues up to
``max_in_flight`` of them on the devices, and several clients queue more.

That is more than a memory question on CPU devices. XLA runs every device's part of a
program on one shared thread pool, and a collective (``psum``, ``pmean``) holds a pool
thread until every device's part has reached it. With a few dozen collective programs
queued, the pool fills with parts that wait for peers which have no thread left to run
on, and after 40 s XLA aborts the whole process (``rendezvous.cc: Termination timeout for
all reduce``), taking every client's resident state with it. Measured on a 2-core machine
with 8 CPU devices (jax 0.10.2, a plain ``jax.pmap`` with ``pmean``): 300 programs
dispatched ahead abort it even for 8x8 arrays; at most 16 behind never did, with up to 24
all-reduces per program; 32 did. ``tests/e2e/test_dispatch_window.py`` is that case
through the server.

So every program the server dispatches for a call or a loop's step is recorded here
(``dispatched``, with one array it computes: when that is ready, the program has run),
and when more than ``size`` (``Settings.dispatch_window``, 8) are outstanding, the worker
that dispatched the last one waits for the oldest. Eight behind keep the devices busy (the
same throughput as 16 on the measurement above) and halve the largest safe depth. The
wait comes after the call committed, on the worker, holding no lock: a call's outcome
does not depend on it, and the event loop never waits.

An error the oldest program met on its devices is not the waiting call's: it is left to
surface where that program's values are read (a deleted or donated buffer, likewise).
Loops also wait for their own steps (``server/loops.py``'s ``_AHEAD``, for a prompt
cancel); this window bounds all the server's programs together, whoever sent them.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import jax

__all__ = ["DispatchWindow", "program_marker"]


class DispatchWindow:
    """The programs the devices may still be working on, oldest first (thread-safe)."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"DispatchWindow(size={size}): the window must hold at least "
                             "one program.")
        self.size = size
        self._lock = threading.Lock()
        self._behind: collections.deque[jax.Array] = collections.deque()

    def __len__(self) -> int:
        return len(self._behind)

    def dispatched(self, marker: jax.Array | None) -> None:
        """Records a program just dispatched (``marker``: an array it computes; ``None``:
        it computes none, nothing to wait for), then waits while more than ``size`` are
        outstanding, oldest first."""
        with self._lock:
            while self._behind and _finished(self._behind[0]):
                self._behind.popleft()  # holds no buffer longer than it must
            if marker is not None:
                self._behind.append(marker)
            if len(self._behind) <= self.size:
                return
        while True:
            with self._lock:
                if len(self._behind) <= self.size:
                    return
                oldest = self._behind.popleft()
            _wait_quietly(oldest)


def _finished(array: jax.Array) -> bool:
    """Whether ``array``'s program has run (or its buffer is gone), without waiting."""
    try:
        return array.is_deleted() or array.is_ready()
    except Exception:  # noqa: BLE001  (a failed program has finished too)
        return True


def _wait_quietly(array: jax.Array) -> None:
    """Waits for ``array``'s program; its failure is its own call's (see the module)."""
    try:
        if not array.is_deleted():
            array.block_until_ready()
    except Exception:  # noqa: BLE001  (raised again where the value is read)
        pass


def program_marker(out: Any, values: list[Any]) -> jax.Array | None:
    """An array a step's program computes, from its outputs ``out`` or its new state
    ``values``: one program computes them all, so when it is ready the program has run.
    ``None`` when the step computed no array (nothing ran on a device). Per call: an
    array output or state value is taken as it is; only else are the trees flattened."""
    if isinstance(out, jax.Array):
        return out
    for value in values:
        if isinstance(value, jax.Array):
            return value
    leaves = jax.tree_util.tree_leaves((out, values))
    return next((x for x in leaves if isinstance(x, jax.Array)), None)
