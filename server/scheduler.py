"""The one scheduler for device work: a queue of ``Call``s, a worker pool, a lock per state.

A call waits in the queue, holding no thread, until four things are true at once: a
worker is free, its session holds fewer than ``session_workers`` workers, no running
call holds one of its states, and (admission, ``statehost.server.admission``) its
program fits in its devices' free memory. Then it takes all its states at once and runs
on a worker. So calls on the same states run one at a time, calls on disjoint states
run side by side, and one session's calls that never return (a jitted endless
``while_loop``, a host callback that sleeps) occupy at most ``session_workers``
threads: the other sessions' calls still get the rest.

Order: the queue is scanned in arrival order, and a call that waits for a state keeps
every later call off that state (first come, first served per state, so a call
touching many states is not starved). A call waiting only for its session's bound
keeps no state from anyone: one session's backlog cannot hold other sessions' states.

Fairness: the calls that may start are served round-robin between namespaces (a call's
namespace is its principal's; see ``Call.namespace``), each namespace starting up to its
weight (``--namespace-weight``) calls per turn. A namespace alone in the queue keeps its
turn and its starts count on, so when another namespace's call comes, the lone one's turn
is over (it had its weight's worth of starts long ago) and the newcomer starts at the next
free worker. So one tenant's flood of calls waits behind itself, not in front of another
tenant's single call: B's call starts when the first worker frees, before A's next start.
A namespace whose every call is blocked (on states, its session's bound, or memory)
passes its turn and blocks no one.

Transfers: a call that only copies outputs its session keeps to the host
(``Call.is_transfer``: the call stream's fetch of a ``RemoteArray``) launches no device
program and locks no state, so it takes no worker: it runs at once on one of the
scheduler's transfer threads (as many as workers), in arrival order when they are all
busy. So reading a result never waits behind other tenants' programs: a tenant's single
call followed by its read waits for one worker, not two.

Memory: a call whose program does not fit now is sent back from its worker before
anything ran (``NotAdmitted``) and waits in the queue with its estimate; it is looked at
again when a call finishes and every ``RECHECK_S`` seconds (memory frees without an event
here too: a session closing, an array collected), and past its deadline it fails with a
``DeviceMemoryError`` in place of the ``CallTimeoutError``.

A queued call whose deadline passes is dropped with a ``CallTimeoutError`` (it never
started: nothing was applied); a cancelled one (``Call.request_cancel``) with a
``CallCancelledError``. A running call cannot be interrupted (openxla/xla#16801): past
its deadline it is reported as running with cancel requested, and work that runs in
steps stops at its next step (``Call.should_stop``).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from statehost.server.admission import RECHECK_S, Demand, NotAdmitted
from statehost.server.calls import Call, CallCancelled, CallStatus, CallTable
from statehost.server.errors import CallTimeoutError

if TYPE_CHECKING:
    from statehost.server.admission import Admission
    from statehost.server.metrics import Metrics

__all__ = ["Scheduler"]

_MSG_TIMEOUT = (
    "{kind} {id}: not started within its {timeout:g} s deadline ({source}). It waited "
    "{waited:.3g} s in the queue for {reason}, and was never started, so nothing was "
    "applied. Fix: send it again (that is safe), with a longer timeout if the server stays "
    "this busy; GET /v1/info lists the calls that have been running long ('stuck')."
)
_MSG_CLOSED = "{kind} {id}: the server is shutting down; the call was never started."


class Scheduler:
    """Runs calls on ``workers`` threads (see the module docstring for the rules).

    Arguments:
        workers: threads running device work.
        session_workers: the most workers one session may hold at once (``None``: all).
        call_timeout: the deadline, in seconds from creation, of a call created without a
            timeout (0: none).
        metrics: the server's metrics, to count cancellations and timeouts and to time the
            queue (``None``: not counted).
        weight: a namespace's weight, the calls it starts per turn (``None``: 1 each).
        admission: checks and reserves device memory (``None``: calls are not admitted by
            memory).
    """

    def __init__(self, workers: int, *, session_workers: int | None = None,
                 call_timeout: float = 0.0, metrics: Metrics | None = None,
                 weight: Callable[[str], int] | None = None,
                 admission: Admission | None = None):
        if workers < 1:
            raise ValueError(f"Scheduler(workers={workers!r}): at least one worker is needed.")
        self.workers = workers
        self.session_workers = min(workers, session_workers or workers)
        self.call_timeout = call_timeout
        self.metrics = metrics
        self.weight = weight or (lambda namespace: 1)
        self.admission = admission
        self.calls = CallTable()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="statehost-call")
        self.transfer_threads = workers
        self._transfer_pool = ThreadPoolExecutor(self.transfer_threads,
                                                 thread_name_prefix="statehost-transfer")
        self._guard = threading.Lock()  # everything below; taken before any call's lock
        self._seq = itertools.count(1)
        self._queue: dict[int, Call] = {}  # call.seq -> call, in arrival order
        self._transfers: dict[int, Call] = {}  # the same, for queued transfers
        self._moving = 0  # transfers running
        self._unsorted = False  # a call put back (memory) broke the arrival order
        self._ring: deque[str] = deque()  # namespaces with queued calls, whose turn is next
        self._turn_left = 0  # calls the holder may still start in its turn (<= 0: over)
        self._holder: str | None = None  # the namespace whose turn it is (the ring's head)
        self._ns_queued: dict[str, int] = {}  # namespace -> its queued calls
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recheck: asyncio.TimerHandle | None = None
        self._awaiters: dict[int, _Awaiter] = {}
        self._held: dict[str, Call] = {}  # state id -> the running call holding it
        self._per_session: dict[str, int] = {}  # session id -> workers it holds
        self._busy = 0
        self._closed = False

    # -- what is in flight ------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Calls waiting for a worker, their session's turn or their states."""
        return self.calls.count(CallStatus.QUEUED)

    @property
    def waiting(self) -> bool:
        """Whether a call waits for a worker now (for its states, its session's bound, or
        memory too; transfers need none): a run of calls on a worker ends for it
        (``stream.Channel._run_calls``). Read without the guard: one dict's truth."""
        return bool(self._queue)

    @property
    def running(self) -> int:
        """Calls holding their states and running now."""
        return self.calls.count(CallStatus.RUNNING)

    def queued_calls(self) -> list[Call]:
        """The calls waiting to start now (read-only: for quotas' ``max_queued``)."""
        return [c for c in self.calls if c.status is CallStatus.QUEUED]

    def lock_count(self) -> int:
        """How many states running calls hold now."""
        with self._guard:
            return len(self._held)

    def stuck(self, after: float, now: float | None = None) -> list[Call]:
        """Running calls that have run longer than ``after`` seconds or past their deadline,
        oldest first."""
        now = time.monotonic() if now is None else now
        found = [c for c in self.calls if c.status is CallStatus.RUNNING and (
            (c.running_s(now) or 0.0) > after or c.is_past_deadline(now))]
        return sorted(found, key=lambda c: c.started or now)

    def by_namespace(self) -> dict[str, dict[str, int]]:
        """``{namespace: {"queued": n, "running": n}}`` (see ``Call.namespace``)."""
        counts: dict[str, dict[str, int]] = {}
        for call in self.calls:
            if call.status in (CallStatus.QUEUED, CallStatus.RUNNING):
                entry = counts.setdefault(call.namespace, {"queued": 0, "running": 0})
                entry[str(call.status)] += 1
        return counts

    def by_session(self) -> dict[str, dict[str, int]]:
        """``{session id prefix ("server" for server work): {"queued": n, "running": n}}``."""
        counts: dict[str, dict[str, int]] = {}
        for call in self.calls:
            if call.status in (CallStatus.QUEUED, CallStatus.RUNNING):
                key = "server" if call.session is None else call.session.id[:8]
                entry = counts.setdefault(key, {"queued": 0, "running": 0})
                entry[str(call.status)] += 1
        return counts

    # -- submitting ---------------------------------------------------------------------
    async def submit(self, call: Call) -> Any:
        """Queues ``call``, runs it on a worker holding its states; returns its result.

        A call created without a timeout gets ``call_timeout``. It raises the work's
        exception, ``CallTimeoutError`` when the deadline passed before it started, or
        ``CallCancelledError`` when it was cancelled before it started. If the awaiting task
        is cancelled (a shutdown past its grace), a call that has not started never will;
        one that runs is asked to stop (``Call.should_stop``), finishes on its worker, and
        stays listed in :attr:`calls` until it does.
        """
        call.apply_default_timeout(self.call_timeout)
        loop = asyncio.get_running_loop()
        self._loop = loop
        awaiter = _Awaiter(loop, loop.create_future())
        with self._guard:
            with call._lock:
                if call.status is CallStatus.CANCELLED:  # before it was submitted
                    raise call.error or CallCancelled(f"{call.kind} {call.id}: cancelled.")
                if call.status is not CallStatus.QUEUED or id(call) in self._awaiters:
                    raise RuntimeError(f"Scheduler.submit: {call.kind} {call.id} is "
                                       f"{call.status} already; a Call is submitted once.")
                call._on_cancel = self._cancelled
            if self._closed:
                raise CallCancelled(_MSG_CLOSED.format(kind=call.kind, id=call.id))
            call.seq = next(self._seq)
            self._enqueue(call)
            self._awaiters[id(call)] = awaiter
            self.calls.add(call)
            start = self._dispatch()
        self._start(start)
        timer = None
        if call.deadline is not None and call.status is CallStatus.QUEUED:
            timer = loop.call_later(max(0.0, call.deadline - time.monotonic()),
                                    self._expire, call)
        try:
            return await awaiter.future
        except asyncio.CancelledError:
            call.request_cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def run(self, keys: Any, fn: Any, *args: Any, kind: str = "work",
                  session: Any = None, timeout: float | None = None) -> Any:
        """Shorthand: ``fn(*args)`` as a call holding the locks of ``keys``."""
        return await self.submit(Call(kind, session, tuple(keys), lambda call: fn(*args),
                                      timeout=timeout))

    def shutdown(self) -> None:
        """Drops every queued call (never started) and waits for the running ones."""
        with self._guard:
            self._closed = True
            for call in [*self._queue.values(), *self._transfers.values()]:
                if call.drop(CallCancelled(_MSG_CLOSED.format(kind=call.kind, id=call.id))):
                    self._finish_queued(call)
        self._pool.shutdown(wait=True, cancel_futures=False)
        self._transfer_pool.shutdown(wait=True, cancel_futures=False)

    def fail_all(self, error: BaseException) -> int:
        """Answers every queued and running call with ``error`` now, for a server whose group
        lost a process (``server/cluster.py``): a running one may be blocked in a collective
        for good, so its awaiter is answered without waiting for its worker."""
        with self._guard:
            for call in list(self._queue.values()):
                if call.drop(error):
                    self._finish_queued(call)
            running = [c for c in self.calls if c.status is CallStatus.RUNNING]
            awaiters = [self._awaiters.pop(id(c), None) for c in running]
        for awaiter in awaiters:
            if awaiter is not None:
                awaiter.answer(None, error)
        return len(running)

    # -- the queue (every method below but _run runs with the guard held) -----------------
    def _enqueue(self, call: Call) -> None:
        if call.is_transfer:  # no turn to take: it needs no worker
            self._transfers[call.seq] = call
            return
        self._queue[call.seq] = call
        ns = call.namespace
        self._ns_queued[ns] = self._ns_queued.get(ns, 0) + 1
        if not self._ring and ns != self._holder:  # the holder's turn goes on (_next_turn)
            self._holder, self._turn_left = ns, self.weight(ns)
        if ns not in self._ring:
            self._ring.append(ns)

    def _dequeue(self, call: Call) -> None:
        if call.is_transfer:
            self._transfers.pop(call.seq, None)
            return
        if self._queue.pop(call.seq, None) is None:
            return
        ns = call.namespace
        left = self._ns_queued.get(ns, 1) - 1
        if left > 0:
            self._ns_queued[ns] = left
        else:
            self._ns_queued.pop(ns, None)

    def _dispatch(self) -> list[Call]:
        """Takes every queued call that can start now off the queue, namespaces taking
        turns, and marks it running; drops those cancelled or past their deadline. Returns
        the calls to hand to the pool (after the guard is released)."""
        start: list[Call] = []
        if self._closed:
            return start
        now = time.monotonic()
        if self._transfers and self._moving < self.transfer_threads:
            self._start_transfers(start, now)
        if not self._queue or self._busy >= self.workers:
            return start
        if self._unsorted:
            self._queue = dict(sorted(self._queue.items()))
            self._unsorted = False
        # 1. In arrival order, the calls free to start: not past their deadline, their
        # session under its bound, and no state held or wanted by an earlier queued call.
        # So the ready calls share no state, and may start in any order.
        ready: dict[str, deque[Call]] = {}
        waited_on: set[str] = set()  # states an earlier queued call waits for
        for call in list(self._queue.values()):
            if call.status is not CallStatus.QUEUED:  # cancelled: its hook may not have run
                self._finish_queued(call)
                continue
            if call.is_past_deadline(now):
                self._time_out(call, now)
                continue
            if self._session_full(call):
                continue
            blocked = any(k in self._held or k in waited_on for k in call.keys)
            waited_on.update(call.keys)
            if not blocked:
                ready.setdefault(call.namespace, deque()).append(call)
        # 2. Namespaces take turns: the ring's head starts up to its weight, then the next.
        short = False
        while ready and self._busy < self.workers:
            if self._turn_left <= 0 and len(self._ring) > 1:  # a lone namespace's long turn
                self._next_turn()
            ns = self._ring[0] if self._ring else next(iter(ready))
            picked = None
            calls = ready.get(ns)
            while calls and picked is None:
                call = calls.popleft()
                if self._session_full(call):  # its session started one in this pass
                    continue
                if not self._fits(call):
                    short = True
                    continue
                picked = call
            if not calls:
                ready.pop(ns, None)
            if picked is None:
                self._next_turn()
                continue
            if not self._begin(picked, now):  # cancelled meanwhile, on another thread
                if self.admission is not None:
                    self.admission.release(picked)
                self._finish_queued(picked)
                continue
            start.append(picked)
            self._turn_left -= 1
            if self._turn_left <= 0:
                self._next_turn()
        if short:
            self._arm_recheck()
        return start

    def _start_transfers(self, start: list[Call], now: float) -> None:
        """Takes queued transfers off their queue, in arrival order, while transfer threads
        are free (they hold no state, no worker and no turn)."""
        for call in list(self._transfers.values()):
            if self._moving >= self.transfer_threads:
                return
            if call.status is not CallStatus.QUEUED:  # cancelled
                self._finish_queued(call)
            elif call.is_past_deadline(now):
                self._time_out(call, now)
            elif not call.begin(now):  # cancelled meanwhile, on another thread
                self._finish_queued(call)
            else:
                self._dequeue(call)
                self._moving += 1
                start.append(call)

    def _is_queued(self, call: Call) -> bool:
        return (self._transfers if call.is_transfer else self._queue).get(call.seq) is call

    def _next_turn(self) -> None:
        """The ring's head has had its turn: the next namespace's starts (a namespace with
        nothing queued any more leaves the ring). A namespace with no one else in the ring
        (alone, or between two of its calls with none queued) keeps its turn, its count
        of starts going below zero, so the next other namespace to queue a call takes the
        turn from it at once (``_dispatch``)."""
        if self._ring:
            self._ring.rotate(-1)
        for ns in [ns for ns in self._ring if ns not in self._ns_queued]:
            self._ring.remove(ns)
        if not self._ring or list(self._ring) == [self._holder]:
            return
        self._holder = self._ring[0]
        self._turn_left = self.weight(self._holder)

    def _fits(self, call: Call) -> bool:
        """Whether a call put back for memory fits now; reserves its memory if so."""
        demand: Demand | None = call.demand
        if self.admission is None or demand is None:
            return True
        verdict = self.admission.check(demand, call.keys)
        if not verdict.fits:
            call.short_of_memory = verdict
            return False
        call.short_of_memory = None
        self.admission.reserve(call, demand)
        return True

    def _begin(self, call: Call, now: float) -> bool:
        """Marks a call running and gives it its states; ``False``: it was cancelled (a
        cancel takes the call's lock, not the guard)."""
        if not call.begin(now):
            return False
        self._dequeue(call)
        for k in call.keys:
            self._held[k] = call
        if call.session is not None:
            sid = call.session.id
            self._per_session[sid] = self._per_session.get(sid, 0) + 1
        self._busy += 1
        return True

    def admit(self, call: Call, demand: Demand) -> None:
        """On the call's worker, before anything ran: reserves ``demand``, or raises
        ``DeviceMemoryError`` (it can never fit) or ``NotAdmitted`` (not now)."""
        if self.admission is None:
            return
        with self._guard:
            held = self.admission.holds(call)
            if held == demand:
                return  # admitted by the dispatcher with this very estimate
            self.admission.release(call)
            verdict = self.admission.check(demand, call.keys)
            if verdict.never:
                raise self.admission.never_fits(call, demand, verdict)
            if not verdict.fits:
                call.short_of_memory = verdict
                raise NotAdmitted(demand)
            self.admission.reserve(call, demand)

    def _arm_recheck(self) -> None:
        """Looks at the calls waiting for memory again in ``RECHECK_S`` (one timer)."""
        loop = self._loop
        if loop is None or self._recheck is not None:
            return

        def arm() -> None:
            if self._recheck is None:
                self._recheck = loop.call_later(RECHECK_S, self._rechecked)

        try:
            loop.call_soon_threadsafe(arm)
        except RuntimeError:  # the loop is closed
            pass

    def _arm_deadline(self, call: Call) -> None:
        """A deadline timer for a call put back in the queue (its ``submit`` armed none if
        it started at once)."""
        awaiter = self._awaiters.get(id(call))
        if awaiter is None or call.deadline is None:
            return
        loop, deadline = awaiter.loop, call.deadline

        def arm() -> None:
            loop.call_later(max(0.0, deadline - time.monotonic()), self._expire, call)

        try:
            loop.call_soon_threadsafe(arm)
        except RuntimeError:  # the loop is closed
            pass

    def _rechecked(self) -> None:
        with self._guard:
            self._recheck = None
            start = self._dispatch()
        self._start(start)

    def _session_full(self, call: Call) -> bool:
        return call.session is not None and \
            self._per_session.get(call.session.id, 0) >= self.session_workers

    def _waiting_for(self, call: Call) -> str:
        """What a queued call is waiting for, in words (for its timeout message)."""
        if call.is_transfer:
            return (f"a free transfer thread: all {self.transfer_threads} were busy copying "
                    "other calls' outputs")
        if call.short_of_memory is not None:
            return "device memory"
        if self._session_full(call):
            return (f"its session's turn: the session was running {self.session_workers} "
                    f"call(s) already, the most one session may run at once "
                    f"(--session-workers)")
        if self._busy >= self.workers:
            return f"a free worker: all {self.workers} were busy (STATEHOST_WORKERS)"
        held = sum(k in self._held for k in call.keys)
        if held:
            return f"{held} of its {len(call.keys)} state(s), held by running calls"
        return "calls queued before it on the same states"

    def _time_out(self, call: Call, now: float) -> None:
        assert call.deadline is not None
        timeout, waited = call.deadline - call.created, now - call.created
        if self.admission is not None and call.demand is not None \
                and call.short_of_memory is not None:
            if call.drop(self.admission.no_room(call, call.demand, call.short_of_memory, now)):
                if self.metrics is not None:
                    self.metrics.call_timeouts.inc()
            self._finish_queued(call)
            return
        error = CallTimeoutError(_MSG_TIMEOUT.format(
            kind=call.kind, id=call.id, timeout=timeout, waited=waited,
            reason=self._waiting_for(call),
            source="its own timeout" if call.timeout is not None
            else "the server's default, --call-timeout"),
            waited_s=round(waited, 3), timeout_s=timeout)
        if call.drop(error):
            if self.metrics is not None:
                self.metrics.call_timeouts.inc()
        self._finish_queued(call)

    def _finish_queued(self, call: Call) -> None:
        """Takes a call that will never start off the queue and answers its awaiter."""
        self._dequeue(call)
        self.calls.discard(call)
        awaiter = self._awaiters.pop(id(call), None)
        if awaiter is not None:
            awaiter.answer(None, call.error or CallCancelled(f"{call.kind} {call.id}: "
                                                             "cancelled."))

    # -- events -------------------------------------------------------------------------
    def _expire(self, call: Call) -> None:
        """The deadline timer of a call (on the event loop)."""
        with self._guard:
            if not self._is_queued(call):
                return  # started, cancelled or dropped already
            self._time_out(call, max(time.monotonic(), call.deadline or 0.0))
            start = self._dispatch()
        self._start(start)

    def _cancelled(self, call: Call, was_queued: bool) -> None:
        """``Call.request_cancel`` took effect (on whichever thread called it)."""
        if self.metrics is not None:
            self.metrics.call_cancellations.labels("queued" if was_queued else "running").inc()
        if not was_queued:
            return
        with self._guard:
            if self._is_queued(call):
                self._finish_queued(call)
            start = self._dispatch()
        self._start(start)

    def _start(self, calls: list[Call]) -> None:
        for call in calls:
            if self.metrics is not None and call.started is not None:
                self.metrics.call_queue_seconds.observe(call.started - call.created)
                self.metrics.namespace_queue_seconds.labels(call.namespace).observe(
                    call.started - call.created)
            try:
                (self._transfer_pool if call.is_transfer else self._pool).submit(self._run, call)
            except RuntimeError:  # the pool shut down between the dispatch and here
                self._run(call, refused=True)

    def _run(self, call: Call, refused: bool = False) -> None:
        """A worker: runs the call, frees its states and its session's turn, starts what
        can start now, then answers the awaiter (nothing here may raise). ``refused``:
        the pool is gone, the work is not run."""
        result: Any = None
        error: BaseException | None = None
        back: Demand | None = None  # the call did not fit in memory: back to the queue
        if refused:
            error = CallCancelled(_MSG_CLOSED.format(kind=call.kind, id=call.id))
        else:
            try:
                result = call.work(call)
            except NotAdmitted as exc:
                back = exc.demand
            except BaseException as exc:  # the awaiter gets it; the worker goes on
                error = exc
        if back is not None and not call.requeue():
            error = call.error  # cancelled while it ran (before anything ran: never started)
            back = None
        if back is None:
            with call._lock:
                call.finished = time.monotonic()
                if error is None:
                    call.status = CallStatus.COMMITTED
                elif call.status is not CallStatus.CANCELLED:
                    call.status, call.error = CallStatus.FAILED, error
        with self._guard:
            if self.admission is not None:
                self.admission.release(call)
            for k in call.keys:
                if self._held.get(k) is call:
                    del self._held[k]
            if call.is_transfer:
                self._moving -= 1
            else:
                if call.session is not None:
                    sid = call.session.id
                    left = self._per_session.get(sid, 1) - 1
                    if left > 0:
                        self._per_session[sid] = left
                    else:
                        self._per_session.pop(sid, None)
                self._busy -= 1
            awaiter = None
            if back is not None and self._closed:
                call.drop(CallCancelled(_MSG_CLOSED.format(kind=call.kind, id=call.id)))
                error, back = call.error, None
            if back is not None:  # queued again, at its place in arrival order
                call.demand = back
                self._enqueue(call)
                self._unsorted = True
                self._arm_deadline(call)
            else:
                awaiter = self._awaiters.pop(id(call), None)
            start = self._dispatch()
        if back is None:
            self.calls.discard(call)
        self._start(start)
        if awaiter is not None:
            awaiter.answer(result, error)


class _Awaiter:
    """The event loop and future of the task awaiting a call's result.

    Answered from any thread (a worker, a cancel, the deadline timer) through
    ``call_soon_threadsafe``: one asyncio future per call, where ``run_in_executor`` makes a
    ``concurrent.futures.Future`` (and its ``Condition``) and chains a second one to it.
    """

    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any]):
        self.loop, self.future = loop, future

    def answer(self, result: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if self.future.done():  # the awaiting task was cancelled
                return
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody awaits the answer any more
            pass
