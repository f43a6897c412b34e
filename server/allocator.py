"""``limit_malloc_arenas``: glibc's malloc arenas capped for a process that runs device work.

XLA's CPU devices run a program on several threads, and glibc gives each thread its own
malloc arena. Then a step's fresh multi-MiB outputs land in memory that must be
page-faulted in again instead of reusing what the previous step freed: a 128 MiB resident
step took about twice as long on the server as locally, and with 2 arenas it matches.
``statehost serve`` calls it before its backend starts; so do the benchmarks for their
local rows, which run the same device work in the benchmark's own process (without it, a
local MLP step with a 1024-wide hidden layer took 10% longer than the server's, and
remote looked faster than local).
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["limit_malloc_arenas"]

_M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Caps the process's malloc arenas (as ``MALLOC_ARENA_MAX`` would), unless that
    variable is set. Must run before the JAX backend starts its threads; a no-op off
    glibc."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):
        pass
