"""Everything one running server holds: settings, states, sessions, callables, scheduler."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from statehost.server.admission import Admission
from statehost.server.auth import Principal, TokenTable
from statehost.server.callable_cache import FunctionCache
from statehost.server.cluster import Leader, check_mirrored
from statehost.server.dispatch_window import DispatchWindow
from statehost.server.errors import SessionNotFoundError
from statehost.server.metrics import Metrics
from statehost.server.named import Registry
from statehost.server.persistence import Persistence
from statehost.server.quotas import Quotas
from statehost.server.scheduler import Scheduler
from statehost.server.settings import Settings
from statehost.server.store import Session, SessionTable, StateStore

__all__ = ["Runtime"]

log = logging.getLogger("statehost.server")


@dataclass
class Runtime:
    settings: Settings
    store: StateStore = field(default_factory=StateStore)
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        self.sessions = SessionTable(self.settings.session_ttl)
        self.functions = FunctionCache(self.settings.function_cache_size)
        self.admission = Admission(
            self.settings.device_memory, self.store.resident,
            value_of=lambda i: getattr(self.store.by_id(i), "_value", None))
        self.scheduler = Scheduler(
            self.settings.workers, session_workers=self.settings.session_workers,
            call_timeout=self.settings.call_timeout, metrics=self.metrics,
            weight=self.settings.weight_of,
            admission=self.admission if self.admission.enabled else None)
        self.window = DispatchWindow(self.settings.dispatch_window)
        self.persistence = Persistence(
            self.settings.data_dir, self.store, self.settings.durability,
            failures=self.metrics.flush_failures,
            max_unflushed_commits=self.settings.max_unflushed_commits)
        self.registry = Registry(self.store, self.persistence)
        self.tokens = TokenTable(self.persistence.db_path)
        self.quotas = Quotas(self.settings, self.persistence, self.store, self.sessions,
                             self.scheduler)
        # The leader of a group of processes (server/cluster.py); None on one process and
        # on a follower's mirror runtime, which shares nothing further.
        self.group: Leader | None = None

    def share(self, call: Any, message: Any = None, where: str = "", *,
              kind: str | None = None, **extra: Any) -> None:
        """In a group, sends ``call`` (decided and checked here) to every follower just
        before it runs (``server/cluster.py``); on one process, nothing. ``kind``: an
        operation of the call other than its start (a loop's ``step``, ``server/loops.py``).
        """
        if self.group is not None:
            self.group.broadcast(kind or call.kind, call.session.id if call.session else None,
                                 call.id, call.keys, message, where, **extra)

    def set_durability(self, namespace: str, durability: Any, where: str) -> None:
        """A namespace's durability. In a group it is an operation of the one order, run
        on the worker (so between two calls' commits on every process: a commit gathers
        for ``sync``, and every process must gather for the same ones); from a route's
        worker thread (a sync route)."""
        if self.group is None:
            self.persistence.set_durability(namespace, durability)
            return
        group = self.group

        def switch() -> None:
            group.broadcast("durability", None, where=where, namespace=namespace,
                            durability=str(durability))
            self.persistence.set_durability(namespace, durability)

        import anyio.from_thread

        group.check(where)
        anyio.from_thread.run(self.scheduler.run, (), switch)

    def free_handles(self, session: Session, names: Any) -> None:
        """Drops arrays ``session`` keeps (the call stream's outputs), on every process."""
        for name in names:
            session.handles.pop(name, None)
        if self.group is not None and self.group.problem() is None:
            self.group.broadcast("free", session.id, names=tuple(names))

    def flush_named(self, ids: list[str]) -> int:
        """``persistence.flush(ids)``; in a group, on every process (the leader writes the
        files, the followers take part in gathering the values: server/cluster.py)."""
        if self.group is not None:
            self.group.broadcast("flush", None, keys=tuple(ids))
        return self.persistence.flush(ids)

    def open_session(self, principal: Principal, client: str = "",
                     where: str = "POST /v1/sessions") -> Session:
        """A new session of ``principal`` (429 past its namespace's ``max_sessions``)."""
        with self.quotas.opening_session(principal, where):
            if self.group is not None:
                self.group.check(where)
            session = self.sessions.create(principal, client)
        if self.group is not None:
            self.group.broadcast("open", session.id, where=where, principal=principal,
                                 client=client)
        return session

    async def submit(self, call: Any, where: str) -> Any:
        """``scheduler.submit(call)``, refused first (429) past its namespace's
        ``max_queued``. Nothing is awaited between the check and the enqueue, so two
        calls on the event loop cannot both pass it. Every route that queues a client's
        work comes here (calls, pushes, pulls, puts, gets, invokes, value reads and writes,
        jobs); deleting a named object does not, since that is how a namespace frees room."""
        self.quotas.check_queued(call, where)
        if self.group is not None:
            check_mirrored(call.kind, where)
            self.group.check(where)
        return await self.scheduler.submit(call)

    def session(self, session_id: object, principal: Principal, where: str) -> Session:
        """``principal``'s open session ``session_id``, or a 404 that says how to get one.

        Another principal's session answers exactly like a closed one: its existence
        is not confirmed, and only the first 8 characters of the id are shown.
        """
        session = self.sessions.get(session_id, principal) if isinstance(session_id, str) \
            else None
        if session is None:
            shown = f"{session_id[:8]}..." if isinstance(session_id, str) else repr(session_id)
            raise SessionNotFoundError(
                f"{where}: session {shown} is not open (deleted, or idle for more than "
                f"{self.settings.session_ttl:g} s). Fix: open a new one with POST /v1/sessions "
                "(statehost.connect does this for you).",
            )
        return session

    def free(self, session: Session) -> int:
        """Frees a session's states, kept arrays, and the callables that refer to them."""
        session.handles.clear()
        if self.group is not None and self.group.problem() is None:
            self.group.broadcast("close", session.id)
        ids = self.store.free(session)
        self.functions.evict_states(ids)
        self.refresh_gauges()
        return len(ids)

    def close_session(self, session: Session, why: str) -> int:
        """Closes ``session`` and frees it, or (while jobs of it are going) keeps what they
        need until the last one ends; returns how many jobs it waits for."""
        going = self.sessions.close(session, why)
        if going:
            log.info("session %s %s while %d job(s) of it run; its states are freed when "
                     "they end", session.id[:8], why, going)
            self.refresh_gauges()
        else:
            self.free(session)
        return going

    def end_job(self, session: Session, job_id: str) -> None:
        """Job ``job_id`` of ``session`` ended: a session closed while it ran is freed now."""
        if self.sessions.release(session, job_id):
            count = self.free(session)
            log.info("session %s (%s) freed %d state(s) after its last job %s ended",
                     session.id[:8], session.closing, count, job_id)

    def expire_sessions(self, now: float | None = None) -> None:
        """Frees every session idle past the TTL (as of ``now``, a ``time.monotonic()``)."""
        for session in self.sessions.pop_expired(now):
            count = self.free(session)
            log.info("session %s expired; freed %d state(s)", session.id[:8], count)

    def refresh_gauges(self) -> None:
        m = self.metrics
        m.sessions.set(len(self.sessions))
        m.resident_states.set(len(self.store))
        m.resident_bytes.set(self.store.nbytes())
        for namespace in self.persistence.namespaces():
            m.namespace_bytes.labels(namespace).set(self.store.nbytes(namespace))
        ledger = self.store.ledger
        m.ledger_bytes.clear()  # a namespace or device that holds nothing leaves no sample
        for namespace, usage in ledger.by_namespace().items():
            for device, n in usage.by_device.items():
                m.ledger_bytes.labels(namespace, device).set(n)
        m.device_state_bytes.clear()
        for device, n in ledger.total().by_device.items():
            m.device_state_bytes.labels(device).set(n)
        m.queue_depth.set(self.scheduler.queued)
        m.session_calls.clear()  # sessions with nothing in flight leave no sample behind
        for session, counts in self.scheduler.by_session().items():
            for status, count in counts.items():
                m.session_calls.labels(session, status).set(count)
        m.calls_stuck.set(len(self.scheduler.stuck(self.settings.stuck_after)))
        if self.group is not None:
            for row in self.group.processes():
                m.group_processes.labels(str(row["index"])).set(int(row["health"] == "ok"))
