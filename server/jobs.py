"""Jobs: server-side work that outlives the request (and the connection) that started it.

A ``Job`` is a loop (``POST /v1/jobs``, run by ``statehost.server.loops``) seen from
the outside: its owner, status, progress (steps done of total, steps/s), its error
(the same JSON body every error answer has) and its result (a ``CallReply``). It
belongs to the session that submitted it and is visible to every session of that
session's principal, so a new process with the same token re-attaches to it; to
anyone else it does not exist. Status moves one way::

    queued ──> running ──> completed | failed | cancelled
       └─────────────────> cancelled | failed   (before its first step)

The worker thread running the loop changes a job; the event loop reads it (routes,
Server-Sent Events) and is woken when it ends (:meth:`Job.watch`).
"""

from __future__ import annotations

import asyncio
import enum
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from statehost.server.auth import Principal
    from statehost.server.calls import Call
    from statehost.server.store import Session
    from statehost.wire import CallReply

__all__ = ["Job", "JobStatus", "JobTable"]

# Finished jobs (and their results) kept for re-attaching clients; the oldest go first.
_MAX_FINISHED = 256


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


_FINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


@dataclass(eq=False)
class Job:
    """One submitted loop; see the module doc.

    Attributes:
        session: the session that submitted it (the owner).
        steps: how many steps it runs (``total`` of its progress).
        keep: ``"last"`` or ``"all"``: which outputs its result holds.
        timeout: seconds after submission at which it stops between steps (``None``: never).
        done: steps committed so far.
        error: the error body (``{"error": {"type", "message", ...}}``) of a failed or
            cancelled job, and ``error_status`` its HTTP status.
        reply: the result of a completed job.
    """

    session: Session
    steps: int
    keep: str = "last"
    timeout: float | None = None
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    status: JobStatus = JobStatus.QUEUED
    done: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: dict[str, Any] | None = None
    error_status: int | None = None
    reply: CallReply | None = None
    reason: str | None = None  # why it was cancelled: "cancelled", "timeout", "shutdown"
    call: Call | None = None
    cancel_requested: bool = False
    on_change: Callable[[Job], None] | None = None
    # Called once, by the first end, before anyone can see the job ended: the server lets
    # its session go there, so a closed session's states are freed when its job is seen done.
    on_end: Callable[[Job], None] | None = None
    _ending: bool = False
    _created_mono: float = field(default_factory=time.monotonic)
    _started_mono: float | None = None
    _finished_mono: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(
        default_factory=list)

    @property
    def principal(self) -> Principal:
        return self.session.principal

    @property
    def is_done(self) -> bool:
        return self.status in _FINAL

    @property
    def deadline(self) -> float | None:
        """The ``time.monotonic()`` past which the loop stops, if it has a timeout."""
        return None if self.timeout is None else self._created_mono + self.timeout

    # -- the worker's side ------------------------------------------------------------
    def should_stop(self) -> str | None:
        """Why the loop must stop before its next step (``None``: it goes on).

        Reads this job's flag and the ``Call``'s (``cancel_requested`` where the scheduler
        has it), so a cancel through either stops it.
        """
        if self.cancel_requested or getattr(self.call, "cancel_requested", False):
            return self.reason or "cancelled"
        deadline = self.deadline
        if deadline is not None and time.monotonic() >= deadline:
            return "timeout"
        return None

    def start(self) -> None:
        with self._lock:
            if self.status is JobStatus.QUEUED:
                self.status = JobStatus.RUNNING
                self.started, self._started_mono = time.time(), time.monotonic()
        self._changed()

    def complete(self, reply: CallReply) -> None:
        self._finish(JobStatus.COMPLETED, reply=reply)

    def fail(self, body: dict[str, Any], status: int) -> None:
        self._finish(JobStatus.FAILED, error=body, error_status=status)

    def stop(self, reason: str, body: dict[str, Any], status: int) -> None:
        """Ends the job as cancelled (by a caller, its timeout, or a shutdown)."""
        self._finish(JobStatus.CANCELLED, error=body, error_status=status, reason=reason)

    def _finish(self, status: JobStatus, **values: Any) -> None:
        with self._lock:
            if self.is_done or self._ending:
                return  # the first end wins (a cancel racing the last step, say)
            self._ending = True
        if self.on_end is not None:
            self.on_end(self)
        with self._lock:
            for name, value in values.items():
                setattr(self, name, value)
            self.status = status
            self.finished, self._finished_mono = time.time(), time.monotonic()
            watchers, self._watchers = self._watchers, []
        for loop, event in watchers:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop is closed: nobody is watching
                pass
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    # -- the event loop's side ---------------------------------------------------------
    def request_cancel(self, reason: str = "cancelled") -> bool:
        """Asks the job to stop: at once if queued, else between two steps.

        Returns:
            Whether the job was still going (a finished job is left as it is).
        """
        with self._lock:
            if self.is_done:
                return False
            self.cancel_requested = True
            self.reason = self.reason or reason
        if self.call is not None:
            self.call.cancel()  # a call that has not started never will
        return True

    def watch(self) -> asyncio.Event:
        """An event of the running event loop, set when this job ends."""
        event = asyncio.Event()
        with self._lock:
            if self.is_done:
                event.set()
            else:
                self._watchers.append((asyncio.get_running_loop(), event))
        return event

    def progress(self) -> dict[str, Any]:
        """Steps done of total, the rate so far and the time left, as JSON."""
        now = time.monotonic()
        done, total = self.done, self.steps
        elapsed = None if self._started_mono is None else \
            (self._finished_mono or now) - self._started_mono
        rate = done / elapsed if elapsed and done else None
        eta = (total - done) / rate if rate and not self.is_done else None
        return {"done": done, "total": total,
                "elapsed_s": None if elapsed is None else round(elapsed, 3),
                "steps_per_second": None if rate is None else round(rate, 3),
                "eta_s": None if eta is None else round(eta, 3)}

    def describe(self) -> dict[str, Any]:
        """The job as ``GET /v1/jobs/{id}`` shows it."""
        return {"id": self.id, "status": str(self.status), "steps": self.steps,
                "keep": self.keep, "timeout": self.timeout, "session": self.session.id[:8],
                "created": self.created, "started": self.started, "finished": self.finished,
                "progress": self.progress(), "cancel_requested": self.cancel_requested,
                "reason": self.reason,
                "error": None if self.error is None else self.error.get("error")}


class JobTable:
    """Every job of this server: the ones going, and the last finished ones.

    Arguments:
        on_change: called (from any thread) after a job's status changed, with the table;
            the server sets its jobs-by-status gauge there.
    """

    def __init__(self, on_change: Callable[[JobTable], None] | None = None,
                 max_finished: int = _MAX_FINISHED):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._on_change = on_change
        self.max_finished = max_finished
        self.tasks: set[asyncio.Future[Any]] = set()  # the tasks driving jobs (kept from GC)

    def add(self, job: Job) -> None:
        job.on_change = self._changed
        with self._lock:
            self._jobs[job.id] = job
        self._changed(job)

    def get(self, job_id: str, principal: Principal) -> Job | None:
        """The job if ``principal`` may see it (its submitter's principal), else ``None``."""
        job = self._jobs.get(job_id)
        return job if job is not None and job.principal == principal else None

    def of(self, principal: Principal) -> list[Job]:
        """``principal``'s jobs, oldest first."""
        with self._lock:
            return [j for j in self._jobs.values() if j.principal == principal]

    def all(self) -> list[Job]:
        """Every job kept (going, and the last finished), oldest first."""
        with self._lock:
            return list(self._jobs.values())

    def going(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if not j.is_done]

    def counts(self) -> dict[str, int]:
        with self._lock:
            jobs = list(self._jobs.values())
        counts = {str(status): 0 for status in JobStatus}
        for job in jobs:
            counts[str(job.status)] += 1
        return counts

    def _changed(self, job: Job) -> None:
        if job.is_done:
            with self._lock:
                finished = [j for j in self._jobs.values() if j.is_done]
                for old in finished[:max(0, len(finished) - self.max_finished)]:
                    del self._jobs[old.id]
        if self._on_change is not None:
            self._on_change(self)

    def __len__(self) -> int:
        return len(self._jobs)
