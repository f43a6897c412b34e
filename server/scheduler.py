"""The one scheduler for device work: a worker pool that runs ``Call``s, a lock per state.

A call first takes the locks of every state it touches, in sorted order (so two
calls can never deadlock), so calls on the same states run one at a time while
calls on disjoint states run side by side. A lock exists only while some call
holds or waits for it, so the table never outgrows the calls in flight
(unknown ids named by a failing request leave nothing behind).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from statehost.server.calls import Call, CallCancelled, CallStatus, CallTable

__all__ = ["Scheduler"]


class _Lock:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class Scheduler:
    def __init__(self, workers: int):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="statehost-call")
        self._locks: dict[str, _Lock] = {}
        self._guard = threading.Lock()
        self.calls = CallTable()

    @property
    def queued(self) -> int:
        """Calls waiting for a worker or for their states' locks."""
        return self.calls.count(CallStatus.QUEUED)

    @property
    def running(self) -> int:
        """Calls holding their locks and running now."""
        return self.calls.count(CallStatus.RUNNING)

    def lock_count(self) -> int:
        """How many state locks exist now (only those of calls in flight)."""
        with self._guard:
            return len(self._locks)

    def _acquire(self, keys: tuple[str, ...]) -> list[_Lock]:
        with self._guard:
            held = []
            for key in keys:
                entry = self._locks.get(key)
                if entry is None:
                    entry = self._locks[key] = _Lock()
                entry.users += 1
                held.append(entry)
        for entry in held:
            entry.lock.acquire()
        return held

    def _release(self, keys: tuple[str, ...], held: list[_Lock]) -> None:
        for entry in reversed(held):
            entry.lock.release()
        with self._guard:
            for key, entry in zip(keys, held, strict=True):
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[key]

    def _execute(self, call: Call) -> Any:
        try:
            return self._locked(call)
        finally:  # here, not in submit: a call runs on even when its awaiting task is gone
            self.calls.discard(call)

    def _locked(self, call: Call) -> Any:
        if call.status is CallStatus.CANCELLED:
            raise CallCancelled(f"{call.kind} {call.id}: cancelled before it started.")
        held = self._acquire(call.keys)
        try:
            if call.status is CallStatus.CANCELLED:
                raise CallCancelled(f"{call.kind} {call.id}: cancelled before it started.")
            call.status, call.started = CallStatus.RUNNING, time.monotonic()
            try:
                result = call.work(call)
            except BaseException as exc:
                call.status, call.error = CallStatus.FAILED, exc
                raise
            call.status = CallStatus.COMMITTED
            return result
        finally:
            call.finished = time.monotonic()
            self._release(call.keys, held)

    async def submit(self, call: Call) -> Any:
        """Runs ``call`` on a worker thread holding its states' locks; returns its result.

        If the awaiting task is cancelled (a shutdown past its grace), a call that has not
        started never will; one that runs finishes on its worker, and stays listed in
        :attr:`calls` until it does.
        """
        self.calls.add(call)
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._pool, self._execute, call)
        except asyncio.CancelledError:
            call.cancel()
            raise

    async def run(self, keys: Any, fn: Any, *args: Any, kind: str = "work",
                  session: Any = None) -> Any:
        """Shorthand: ``fn(*args)`` as a call holding the locks of ``keys``."""
        return await self.submit(Call(kind, session, tuple(keys), lambda call: fn(*args)))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
