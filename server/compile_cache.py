"""Where a call's compiled program comes from: shared, JAX's persistent cache, or compiled.

Three layers keep a server from compiling the same program twice:

1. a session's own transform keeps its plans (``callable_cache.FunctionCache``);
2. transforms of the same code in other sessions share their plans and compiled
   programs through one :class:`~statehost.transform.ProgramCache`
   (``callable_cache.share_programs``);
3. JAX's persistent compilation cache, in ``<data dir>/compile-cache``, keeps the
   compiled executables across restarts (:func:`persistent_compile_cache`): after a
   restart the function is traced again, and its executable is read from disk.

:class:`CompileSources` counts each program in ``statehost_compiles_total`` by
``source``: ``fresh`` (XLA compiled it), ``persistent`` (every executable its first
run needed came from JAX's disk cache) or ``shared`` (another session's program).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.monitoring
from jax._src import compilation_cache as _jax_compilation_cache

from statehost.server.persistence.permissions import make_private_dir

__all__ = ["CompileSources", "compile_cache_dir", "persistent_compile_cache"]

log = logging.getLogger("statehost.server")

# JAX records one of these per XLA compile that consults the persistent cache
# (jax/_src/compiler.py, compile_or_get_cached, jax 0.10.2).
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"

# Every program is written, however small or quick to compile: a server's programs are
# often tiny, and JAX's defaults (1 s of compile time) would keep none of them.
_CONFIG = {
    "jax_persistent_cache_min_compile_time_secs": 0.0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
}


def compile_cache_dir(data_dir: Path) -> Path:
    """Where the server keeps JAX's persistent compilation cache."""
    return Path(data_dir) / "compile-cache"


@contextlib.contextmanager
def persistent_compile_cache(directory: Path | None) -> Iterator[None]:
    """JAX's persistent compilation cache in ``directory`` while the block runs
    (``None``: left as it is); JAX's previous configuration is restored afterwards.

    JAX's configuration is process-wide: a process runs one server, so this is the
    server's. ``reset_cache`` makes JAX open the new directory even if it already
    compiled something (JAX opens its cache once, at the first compile after start).
    """
    if directory is None:
        yield
        return
    # JAX writes its entries with the process's umask; in a 0700 folder no one else enters
    # them (the data dir's rule: server/persistence/permissions.py).
    make_private_dir(directory)
    names = ["jax_compilation_cache_dir", *_CONFIG]
    saved = {name: getattr(jax.config, name) for name in names}
    for name, value in {"jax_compilation_cache_dir": str(directory), **_CONFIG}.items():
        jax.config.update(name, value)
    _jax_compilation_cache.reset_cache()
    log.info("compile cache: JAX's persistent compilation cache is in %s", directory)
    try:
        yield
    finally:
        for name, value in saved.items():
            jax.config.update(name, value)
        _jax_compilation_cache.reset_cache()


class CompileSources:
    """A ``ProgramObserver`` that counts programs by source in ``statehost_compiles_total``.

    JAX's persistent-cache events are counted per thread while a program's first run
    is under way (JAX compiles on the calling thread), so calls running side by side
    on other workers do not blur each other's counts. A first run that met at least
    one persistent-cache hit and no miss loaded everything from disk: ``persistent``.
    Any miss, or no event at all (the cache is off), is a compile: ``fresh``.

    Arguments:
        compiles: the ``statehost_compiles`` counter, labelled by ``source``.
    """

    def __init__(self, compiles: Any):
        self._compiles = compiles
        self._local = threading.local()
        self._listening = False

    def start(self) -> None:
        """Listens to JAX's compilation-cache events (until :meth:`stop`)."""
        if not self._listening:
            jax.monitoring.register_event_listener(self._on_event)
            self._listening = True

    def stop(self) -> None:
        if self._listening:
            jax.monitoring.unregister_event_listener(self._on_event)
            self._listening = False

    def _on_event(self, event: str, **_: Any) -> None:
        tally = getattr(self._local, "tally", None)
        if tally is not None and event in tally:
            tally[event] += 1

    @contextlib.contextmanager
    def built(self) -> Iterator[None]:
        outer = getattr(self._local, "tally", None)
        tally = self._local.tally = {_HIT: 0, _MISS: 0}
        try:
            yield
        finally:
            self._local.tally = outer
            if outer is not None:  # a program built inside another's first run
                for event, count in tally.items():
                    outer[event] += count
            persistent = tally[_HIT] > 0 and tally[_MISS] == 0
            self._compiles.labels("persistent" if persistent else "fresh").inc()

    def adopted(self) -> None:
        self._compiles.labels("shared").inc()
