"""Flushing dirty named states: on a timer, on demand, and at shutdown."""

from __future__ import annotations

import asyncio
import logging

from statehost.server.runtime import Runtime

__all__ = ["flush", "flush_ids", "flusher"]

log = logging.getLogger("statehost.server")


async def flush_ids(rt: Runtime, ids: list[str]) -> int:
    """Writes these named states, holding their locks so each value is a committed one."""
    if not ids:
        return 0
    return await rt.scheduler.run(ids, rt.registry.flush, ids)


async def flush(rt: Runtime) -> int:
    """Writes every named state changed since it was last written."""
    return await flush_ids(rt, rt.store.dirty())


async def flusher(rt: Runtime) -> None:
    while True:
        await asyncio.sleep(rt.settings.flush_interval)
        try:
            await flush(rt)
        except Exception:  # a full disk must not stop the server; the next round retries
            log.exception("flushing named states failed")
