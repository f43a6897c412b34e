"""The one staging/commit path: every change of resident states is a ``Transaction``.

Calls, pushes, puts, invokes of registered functions and JSON value writes all
change states the same way, in this order (DESIGN "Commit is the last step"):

1. **stage** the uploaded values (checked against the caller's view: a state it
   cannot see is a 404, never an overwrite; an upload based on an outdated
   version is a 409, and one past a namespace's byte quota a 429 (``quotas.py``):
   nothing is staged);
2. **run** the transform inside :meth:`Transaction.running`, which defers its state
   writes (``statehost.transform.defer_writes``) instead of installing them;
3. the caller copies out the outputs and pulled states (:meth:`Transaction.current`
   reads the values the commit will install);
4. :meth:`Transaction.commit`: check the byte quotas against the exact sizes of the
   values it installs (a call can grow a state; 429), for ``sync`` durability write the
   new values to disk, and only then install them and bump the versions (the store
   re-measures them in its byte ledger).

Any failure before step 4 ends in :meth:`Transaction.rollback`: every state
keeps the value, write count and version it had.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jax

from statehost import State
from statehost._errors import brief
from statehost._state import StateSnapshot
from statehost.server.errors import (
    PayloadTooLargeError,
    ProtocolError,
    StateConflictError,
    StateNotFoundError,
    StorageError,
    ValidationError,
)
from statehost.server.persistence import Durability
from statehost.server.persistence import StateRecord as DurableRecord
from statehost.server.persistence.errors import describe_failure
from statehost.server.placement import place
from statehost.transform import PendingWrites, defer_writes
from statehost.wire import HandleRef, Section, StateRecord, StateRef, is_state_id

if TYPE_CHECKING:
    from statehost.server.ledger import PerDevice
    from statehost.server.quotas import Charge
    from statehost.server.runtime import Runtime
    from statehost.server.store import Session

__all__ = ["Commit", "Transaction"]

_MSG_MISSING_STATES = (
    "{where}: this session has no state with id {ids}. The server frees a session's states "
    "when the session is deleted or idle past its TTL, a named state goes with its deleted "
    "object, and a state made by another session is not visible here. Fix: push the values "
    "again (client.push(module)) or re-run the call: statehost's client forgets a state the "
    "server answered missing, and uploads it with the next call."
)
_MSG_NOT_YOURS = (
    "{where}: no state with id {ids} is visible to this session; an upload cannot create a "
    "state under an id that belongs to someone else. Fix: upload your own states (every "
    "State made in this process has its own id), or use copy.deepcopy(state) for a new id."
)
_MSG_CONFLICT = (
    "{where}: refused a lost update, nothing was committed. {lines}. Someone committed a newer "
    "value since this client last synced. Fix: client.pull(...) the state (dropping the local "
    "change) and re-run, or pass retries=N to client.pmap/vmap/jit to do that automatically."
)
_MSG_STORAGE = (
    "{where}: the call was not applied: namespace durability 'sync' makes writing the new "
    "value{s} of {names} to disk part of the commit, and that failed ({why}). Every state "
    "keeps its previous value and version. Fix: the operator frees disk space or repairs "
    "the data directory (the server log names the files); then retry."
)


@dataclass(frozen=True)
class Commit:
    """What a committed transaction changed.

    Attributes:
        written: ids of the states the run wrote, in order.
        uploaded: ids of the uploaded states (new ones included).
        versions: the version of every state the transaction touched, after it.
        uploaded_versions: each uploaded state's version right after its upload.
    """

    written: list[str]
    uploaded: list[str]
    versions: dict[str, int]
    uploaded_versions: dict[str, int]


class Transaction:
    """One all-or-nothing change of the states ``session`` can see; see the module doc."""

    def __init__(self, rt: Runtime, session: Session, where: str, *,
                 charge: Charge | None = None):
        self.rt = rt
        self.charge = charge  # where its new states count for quotas (a put's namespace)
        self.store = rt.store
        self.session = session
        self.where = where
        self.new: dict[str, State] = {}
        self.old: dict[str, tuple[State, StateSnapshot]] = {}
        self.uploaded: list[str] = []
        self.loaded: set[str] = set()  # states handed out by load_ref
        self.pending = PendingWrites()

    # -- looking states up --------------------------------------------------------
    def lookup(self, state_id: str) -> State | None:
        """The state if this session may see it (or it is new in this transaction)."""
        return self.new.get(state_id) or self.store.get(state_id, self.session)

    def require(self, ids: Any) -> list[State]:
        """The states ``ids``, or a 404 naming every one this session cannot see."""
        ids = tuple(ids)
        states = [self.lookup(i) for i in ids]
        if any(state is None for state in states):
            missing = [i for i, state in zip(ids, states, strict=True) if state is None]
            raise StateNotFoundError(
                _MSG_MISSING_STATES.format(where=self.where, ids=", ".join(missing)),
                missing=missing)
        return states

    def load_ref(self, ref: StateRef | HandleRef) -> Any:
        """``persistent_load``: a state reference becomes the resident ``State`` itself, an
        array handle the array this session keeps under that name."""
        if isinstance(ref, HandleRef):
            return self.session.kept(ref.id, self.where)
        state = self.lookup(ref.id) if isinstance(ref.id, str) else None
        if state is None:
            raise StateNotFoundError(
                _MSG_MISSING_STATES.format(where=self.where, ids=ref.id), missing=[ref.id])
        self.loaded.add(state.id)
        return state

    # -- staging ------------------------------------------------------------------
    def stage(self, section: Section | None, bases: dict[str, int | None]) -> list[str]:
        """Puts the uploaded ``StateRecord``s of ``section`` in place; returns their ids.

        ``bases`` (the message's ``uploads``) maps each uploaded id to the version its
        value is based on; a record not listed there is refused (it would escape the
        scheduler's locks), and so is a stale base (409, nothing staged).
        """
        if section is None:
            return []
        records = _load_records(section, self.where)
        conflicts = []
        for record in records:
            if record.id not in bases:
                raise ProtocolError(
                    f"{self.where}: the states section holds state {record.id}, which "
                    "header.uploads does not list. Fix: send states with statehost's client.")
            state = self.lookup(record.id)
            if state is None:
                if not self.store.may_create(record.id, self.session):
                    raise StateNotFoundError(
                        _MSG_NOT_YOURS.format(where=self.where, ids=record.id),
                        missing=[record.id])
                continue
            meta = self.store.meta(record.id)
            if meta is not None and bases[record.id] != meta.version:
                conflicts.append({
                    "id": record.id, "name": meta.name or record.name or record.id[:8],
                    "server_version": meta.version, "base_version": bases[record.id],
                    "writer": meta.writer,
                })
        if conflicts:
            lines = "; ".join(
                f"{c['name']}: the server has version {c['server_version']} (by {c['writer']}), "
                f"the upload is based on version {c['base_version']}" for c in conflicts)
            raise StateConflictError(_MSG_CONFLICT.format(where=self.where, lines=lines),
                                     conflicts=conflicts)
        self._check_quota(records)
        for record in records:
            value = self._place(record)
            state = self.lookup(record.id)
            if state is None:
                self.new[record.id] = record._replace(value=value).to_state()
            else:
                self.old.setdefault(record.id, (state, state.snapshot()))
                state.revert(StateSnapshot(value, state.write_count))
            self.uploaded.append(record.id)
        return [r.id for r in records]

    def _check_quota(self, records: list[StateRecord]) -> None:
        """A 429 before anything is placed if the uploads (on the default device, where
        ``_place`` puts them) would take a namespace past a byte quota."""
        from statehost.server.quotas import host_bytes

        device = jax.devices()[0]
        key = f"{device.platform}:{device.id}"
        items = [(r.id, {key: host_bytes(r.value)}) for r in records]
        quotas = self.rt.quotas
        quotas.check_bytes(quotas.deltas(items, self.session, self.charge), self.where,
                           "the uploads need")

    def _commit_deltas(self) -> dict[str, PerDevice]:
        """What this commit changes in the ledger, per namespace, from the exact values."""
        measure = self.store.ledger.measure_value
        touched = {*self.uploaded, *(s.id for s in self.pending.values)}
        items = [(i, measure(self.current(s))) for i in touched
                 if (s := self.lookup(i)) is not None]
        return self.rt.quotas.deltas(items, self.session, self.charge)

    def _place(self, record: StateRecord) -> Any:
        try:
            return place(record.value)  # global arrays in a group (server/placement.py)
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            cls = PayloadTooLargeError if "RESOURCE_EXHAUSTED" in text else ValidationError
            raise cls(
                f"{self.where}: the uploaded value of state {record.name or record.id[:8]!r} "
                f"cannot be placed on the server's devices ({text:.300}). Nothing was "
                "committed. Fix: upload arrays (or pytrees of arrays) that fit in device "
                "memory.") from exc

    def replace(self, state: State, value: Any) -> None:
        """A direct write (the JSON value API): installed at commit, like a run's writes."""
        self.pending.write(state, value)

    # -- running ------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Transform calls inside leave states untouched; their writes wait for commit."""
        with defer_writes() as pending:
            yield
        for state, value in pending.values.items():
            self.pending.write(state, value)

    def current(self, state: State) -> Any:
        """The value ``state`` will have once this transaction commits."""
        return self.pending.read(state)

    # -- the end ------------------------------------------------------------------
    def commit(self) -> Commit:
        """Writes ``sync`` namespaces' new values to disk, then installs everything."""
        store, uploaded = self.store, self.uploaded
        written = [s.id for s in self.pending.values]
        existing = [i for i in uploaded if i not in self.new]
        # Quotas by the exact sizes (a call can grow a state), checked before the disk
        # write and held until the values are installed.
        with self.rt.quotas.admitting(self._commit_deltas, self.where):
            self._write_durable(existing, written)
            writer = self.session.writer
            for state in self.new.values():
                store.add(state, self.session)
            self.pending.commit()
            uploaded_versions: dict[str, int] = {}
            if uploaded:  # an upload is a commit (version + 1), the run's write after it too
                store.bump(existing, writer)
                uploaded_versions = {i: store.meta(i).version for i in uploaded}
            store.bump(written, writer)
        versions = {i: store.meta(i).version for i in (*uploaded, *written, *self.loaded)}
        self.new, self.old = {}, {}
        return Commit(written, list(uploaded), versions, uploaded_versions)

    def _write_durable(self, uploaded: list[str], written: list[str]) -> None:
        """For ``sync`` namespaces, the disk write is part of the commit: it goes first.

        For the others, a namespace whose flushes fail takes no more commits once its
        backlog passes the bound (``Persistence.check_backlog``): they would be lost.
        """
        steps = {i: 1 for i in uploaded}
        for state_id in written:
            steps[state_id] = steps.get(state_id, 0) + 1
        records, names = [], []
        now = time.time()
        persistence = self.rt.persistence
        for state_id, step in steps.items():
            meta = self.store.meta(state_id)
            if meta is None or meta.namespace is None:
                continue
            if persistence.durability(meta.namespace) is not Durability.SYNC:
                try:
                    persistence.check_backlog(meta.namespace)
                except StorageError as exc:
                    raise StorageError(f"{self.where}: {exc}") from exc
                continue
            state = self.store.by_id(state_id)
            records.append(DurableRecord(state_id, self.current(state), meta.version + step,
                                         self.session.writer, now))
            names.append(meta.name or state_id[:8])
        if not records:
            return
        try:
            persistence.write(records)
        except (OSError, StorageError) as exc:
            why = describe_failure(exc) if isinstance(exc, OSError) else \
                str(exc).removeprefix("the call was not applied: ")
            raise StorageError(_MSG_STORAGE.format(
                where=self.where, s="s" if len(names) > 1 else "", names=", ".join(names),
                why=why)) from exc

    def rollback(self) -> None:
        """Undoes every staged upload; nothing of this transaction remains."""
        for state, snapshot in self.old.values():
            state.revert(snapshot)
        self.new, self.old = {}, {}
        self.pending = PendingWrites()


def _load_records(section: Section, where: str) -> list[StateRecord]:
    from statehost.server.callable_cache import unpickle

    records = unpickle(section, None, "states", where)
    if not isinstance(records, list) or not all(_is_record(r) for r in records):
        raise ProtocolError(
            f"{where}: the states section must be a list of StateRecord(State subclass, "
            f"32-hex id, name, tag, value); got {brief(records)}. Fix: send states with "
            "statehost's client.")
    return records


def _is_record(record: Any) -> bool:
    return (isinstance(record, StateRecord) and isinstance(record.cls, type)
            and issubclass(record.cls, State) and is_state_id(record.id)
            and isinstance(record.name, str | None) and isinstance(record.tag, str | None))
