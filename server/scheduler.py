"""The one scheduler for device work: worker threads plus a lock per state.

Calls run off the event loop on a small thread pool. A call first takes the
locks of every state it touches, in sorted order (so two calls can never
deadlock), so calls on the same states run one at a time while calls on
disjoint states run side by side.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["Scheduler"]

T = TypeVar("T")


class Scheduler:
    def __init__(self, workers: int):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="statehost-call")
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.queued = 0
        self.running = 0

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = threading.Lock()
            return lock

    def forget(self, keys: Iterable[str]) -> None:
        """Drops the locks of freed states."""
        with self._guard:
            for key in keys:
                self._locks.pop(key, None)

    def _locked(self, keys: list[str], fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        locks = [self._lock(k) for k in keys]
        for lock in locks:
            lock.acquire()
        self.queued -= 1
        self.running += 1
        try:
            return fn(*args)
        finally:
            self.running -= 1
            for lock in reversed(locks):
                lock.release()

    async def run(self, keys: Iterable[str], fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn(*args)`` on a worker thread holding the locks of ``keys``."""
        self.queued += 1
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._locked, sorted(set(keys)), fn, args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
