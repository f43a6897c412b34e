"""Flushing dirty named states from the event loop: on a timer, on demand, and at shutdown.

The writes themselves run in the scheduler's threads, holding the states' locks, through
:meth:`Persistence.flush`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from statehost.server.persistence.errors import StorageError

if TYPE_CHECKING:  # the runtime imports this package
    from statehost.server.runtime import Runtime

__all__ = ["flush", "flush_ids", "flusher"]

log = logging.getLogger("statehost.server")


async def flush_ids(rt: Runtime, ids: list[str]) -> int:
    """Writes these named states, holding their locks so each value is a committed one."""
    if not ids:
        return 0
    return await rt.scheduler.run(ids, rt.flush_named, ids)


async def flush(rt: Runtime) -> int:
    """Writes every named state changed since it was last written."""
    return await flush_ids(rt, rt.persistence.dirty())


async def flusher(rt: Runtime) -> None:
    """Flushes every ``flush_interval`` seconds until cancelled."""
    while True:
        await asyncio.sleep(rt.settings.flush_interval)
        try:
            await flush(rt)
        except StorageError as exc:  # a full disk must not stop the server: retry next round
            log.warning("flushing named states failed; retrying in %g s: %s",
                        rt.settings.flush_interval, exc)
        except Exception:
            log.exception("flushing named states failed")
