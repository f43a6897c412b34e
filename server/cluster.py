"""A server spanning a ``jax.distributed`` group: joining it, the leader's operation
stream to its followers, and the heartbeats that tell it when one is lost (issue 14).

**The group.** ``statehost serve --coordinator HOST:PORT --num-processes N --process-id I``
(or ``--cluster auto``: ``jax.distributed.initialize()``'s own detection of SLURM,
Kubernetes or TPU pods) joins the group before JAX is used, with gloo collectives on CPU.
Every state is a global ``jax.Array`` over all the group's devices, and every process
must run the same computations in the same order (jax ``multi_process.md``). Process 0
leads: it serves the HTTP API and the client channel. The others follow
(``server/follower.py``): they answer ``GET /v1/health`` and replay the leader's
operations on a mirror ``Runtime``, through the very service functions the leader runs
(``run_call``, ``push_states``, ``pull_states``, ``put_object``, ``get_object``).

**One total order, decided by the leader.** In a group the leader runs all device work on
one worker (``Settings``: ``workers=1``). Each service function, once the leader has checked
what only it checks (the frame, the token, the session, quotas, admission, staged versions
and missing states), calls :meth:`Runtime.share`, which sends the operation to every
follower just before it runs. So bad input never reaches a follower, and ids (session,
call and state ids) are the leader's, never minted again on a follower. An operation is
:class:`ClusterOp` (its kind, session, call id and lock keys) followed by the typed wire
message the leader decoded (``statehost.wire``), re-encoded once: arguments travel once,
not once per device.

**The channel: a TCP stream from the leader to each follower**, rather than the
coordination service's key-value store. The store is a round trip to the coordinator per
key and keeps what it is given (an argument of 128 MiB would stay there); a stream keeps
the order for free, carries arguments once, and brings heartbeats and acknowledgements
back on the same connection, whose closing is an immediate sign of loss. The store is
used only to meet: the leader puts its stream's address and a fresh random secret there
(``statehost/cluster/*``); a follower reads them (so it needs no extra flag) and proves
it knows the secret (an HMAC of the leader's nonce) before the leader sends anything.

**Results come back on the same connection.** Where the leader reads an array laid
out over every process (a call's outputs, a pulled or persisted state), each follower
sends its shards of it to the leader (``Follower.send``, ``Leader.receive``; tagged with
the operation's ``seq``), instead of every process running ``process_allgather``, a gloo
collective: measured here (a tiny seed call, 2 x 4 CPU devices), the collective cost more
CPU than the rest of the call. The leader waits for the shards no longer than the
follower lives: a loss ends the wait with ``ClusterUnavailableError``. Each op is pickled
once and its bytes written to every follower; ``statehost_cluster_broadcast_bytes_total``
counts them.

**Failure.** A follower sends a heartbeat every ``heartbeat_timeout / 4`` s (at most
0.5 s). The leader holds it lost when none came for ``heartbeat_timeout`` s, or at once
when its connection closes. Then the leader's ``/v1/health`` answers 503 naming the
process, and new work is refused with ``ClusterUnavailableError`` (503) before it is
queued: nothing new can start a collective that would never complete. A call running
when the peer dies may be inside a collective, which gloo does not abandon (jax 0.10.2,
checked: a ``psum`` with a SIGKILLed peer blocks for good); that call's client gets
``ClusterUnavailableError`` at once, its worker thread stays blocked, and the group must
be restarted (all processes). ``jax_enable_recoverability`` is set so that the
coordination service does not terminate the surviving processes when it misses a
heartbeat (jax 0.10.2 does by default: "Terminating process because the JAX distributed
service detected fatal errors"); the leader stays up to say what happened. A follower
whose leader is gone exits (status 3).

**Persistence: the leader gathers.** Only the leader keeps a data dir. Writing a named
state gathers its value (a collective), so every process runs the same persistence code:
a ``sync`` commit's write inside the call, an ``interval`` flush as a ``flush`` operation
(``Runtime.flush_named``); only the leader writes the file (``persistence/files.py``). At
start the leader reloads its states, then sends its database and state files to the
followers as the first operation (``load``), and each reloads the same states from that
copy (placed as global arrays as recorded). The data dir records the group's process
count (``<data dir>/processes``); another count is refused, with how to migrate. Measured
here (2 x 4 CPU devices, one loaded 2-core machine): putting a 128 MiB state takes 0.4 s
with ``interval`` durability and 3.5 s with ``sync`` (the gather over gloo is most of it,
2-3 s); a restart that reloads it starts in the same ~12 s as an empty one.

**Loops and jobs: the leader decides every step.** A loop (``client.loop``, a job of
``POST /v1/jobs``) is one call on the leader's worker, and only the leader knows when it
stops: between two steps it reads the job's cancel flag and its deadline, and a step may
fail (``server/loops.py``). So the loop is shared once, as a ``loop`` operation (its
``LoopRequest``: each follower stages, resolves and unpickles it on a ``LoopRun`` of its
own), then each step as a ``step`` operation (its index, no payload: ~250 bytes) that
the leader sends just before it runs that step, and last a ``loop_end`` (with the reply's gather, or
without: stopped, failed, or sent back to the queue by admission). A follower runs step
``i`` only once the leader has decided to run it, and runs every step the leader runs:
stopping is the leader not sending a next ``step``, so nothing needs to be agreed, and the
ops of other sessions (a session opened or closed while the loop runs) fall in between
in the same order. Rejected: each step as a ``call`` operation would send and stage the
arguments and the callable again every step; a follower running the loop on its own,
waiting on a "go on / stop" message per step, would have to read the stream inside an
operation and set aside the other operations that come meanwhile. A follower lost during
a loop fails its job at once with ``ClusterUnavailableError``, as a call
(``Scheduler.fail_all``); the leader's next ``step`` is refused, so its worker stops there
(unless the step holds a collective, which stays blocked as a call's would).

**Not done (documented limits).** ``MIRRORED`` lists what runs on every process (every
kind of call a client can queue today: calls, loops and jobs, transfers, named objects,
registered functions' invokes and the JSON value API); a new kind is refused with
``GroupUnsupportedError`` until it is mirrored. A namespace's durability change is an
operation (``durability``) run on the leader's one worker, so every process switches
between the same two commits.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import logging
import math
import pickle
import queue
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from statehost.server.errors import ClusterUnavailableError, GroupUnsupportedError
from statehost.server.settings import Settings

__all__ = ["MIRRORED", "ClusterOp", "Leader", "check_mirrored", "heartbeat_interval", "join",
           "read_message", "send_message"]

log = logging.getLogger("statehost.server")

#: The call kinds every process runs; the leader refuses others in a group.
MIRRORED = frozenset({"call", "push", "pull", "put", "get", "fetch", "delete", "register",
                      "invoke", "read", "write", "loop"})

_KEY_ADDRESS = "statehost/cluster/address"
_KEY_SECRET = "statehost/cluster/secret"
_HEAD = struct.Struct(">QI")  # the whole message's length, its header's length
_MEET_TIMEOUT_S = 300.0
_INLINE_BYTES = 1 << 20  # an op's body up to this is written by its caller's thread
_IOV_MAX = 512  # chunks one sendmsg takes (Linux allows 1024)

_MSG_LOST = (
    "{where}: process {processes} of this server's group of {count} is lost ({why}); "
    "nothing new runs, since every operation needs every process. Fix: restart the whole "
    "group (every `statehost serve` of it, leader included): named states come back as "
    "last written to disk (at once for durability sync, else by the last flush)."
)
_MSG_STARTING = (
    "{where}: this server's group of {count} processes is still forming ({have} of {want} "
    "follower(s) connected). Fix: start every follower (statehost serve --coordinator ... "
    "--process-id I); retry once GET /v1/health says ok."
)
_MSG_NOT_MIRRORED = (
    "{where}: {kind} is not supported on a server spanning several processes yet (only "
    "calls, loops and jobs, pushes, pulls, puts, gets, fetches and deletes of named "
    "objects, registered functions and the JSON value API are run on every process). Fix: "
    "run it on a single-process server, or use client.pmap/vmap/jit."
)



def heartbeat_interval(settings: Settings) -> float:
    return min(0.5, settings.heartbeat_timeout / 4)


# -- joining ------------------------------------------------------------------------
def join(settings: Settings) -> tuple[int, int]:
    """``jax.distributed.initialize`` for ``settings``; returns (process index, count).

    Runs before JAX is otherwise used. CPU collectives go through gloo (the only CPU
    implementation of multi-process collectives in jax 0.10.2).
    """
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_recoverability", True)  # see the module docstring
    if settings.coordinator is None:  # --cluster auto: SLURM, Kubernetes, TPU pods
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(settings.coordinator, settings.num_processes or 1,
                                   settings.process_id or 0)
    return jax.process_index(), jax.process_count()


def _kv() -> Any:
    from jax._src.distributed import global_state

    return global_state.client


# -- framing ------------------------------------------------------------------------
def send_message(sock: socket.socket, header: Any, body: Any = None) -> int:
    """One message: a pickled header, then (optionally) a wire frame (``Encoded``, or
    ``Buffers``); returns the bytes sent."""
    return send_encoded(sock, encode_message(header, body), body)


def encode_message(header: Any, body: Any = None) -> bytes:
    """The length prefix and pickled header of a message (``send_encoded`` sends them)."""
    head = pickle.dumps(header, protocol=5)
    size = 0 if body is None else body.nbytes
    return _HEAD.pack(4 + len(head) + size, len(head)) + head


def send_encoded(sock: socket.socket, head: bytes, body: Any = None) -> int:
    """A message ``encode_message`` began: one ``sendmsg`` of the header and the body's
    chunks (one system call, and no copy of the body)."""
    chunks = [memoryview(c).cast("B") for c in [head, *(() if body is None else body.chunks())]]
    total = sum(c.nbytes for c in chunks)
    sent = sock.sendmsg(chunks[:_IOV_MAX])
    for chunk in chunks:  # what one sendmsg did not take (interrupted; many chunks)
        if sent >= chunk.nbytes:
            sent -= chunk.nbytes
            continue
        sock.sendall(chunk[sent:])
        sent = 0
    return total


@dataclass(frozen=True)
class Buffers:
    """A message body of raw host buffers (a follower's shards)."""

    parts: tuple[Any, ...]

    @property
    def nbytes(self) -> int:
        return sum(memoryview(p).nbytes for p in self.parts)

    def chunks(self) -> tuple[Any, ...]:
        return self.parts


def _read_exactly(sock: socket.socket, n: int) -> memoryview:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the connection closed")
        got += k
    return view


def read_message(sock: socket.socket) -> tuple[Any, memoryview | None]:
    """The header and the frame's bytes (``None`` without one) of the next message."""
    total, head_len = _HEAD.unpack(_read_exactly(sock, _HEAD.size))
    data = _read_exactly(sock, total - 4)
    header = pickle.loads(data[:head_len])
    return header, (data[head_len:] if total - 4 > head_len else None)


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _mac(secret: str, nonce: bytes) -> bytes:
    return hmac.new(secret.encode(), nonce, hashlib.sha256).digest()


# -- operations ---------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterOp:
    """One decided operation, in the leader's order (``seq``), with the leader's ids.

    Attributes:
        kind: ``open``/``close`` (sessions), a ``Call`` kind of ``MIRRORED``, or ``expire``.
        seq: its place in the total order (1, 2, ...).
        session: the session id it acts in (``None``: none).
        call_id: the leader's call id.
        keys: the state ids the leader's call holds.
        extra: what the kind needs besides its wire message (``principal`` and ``client``
            for ``open``; the object row and ``pull`` for ``get``; ``namespace`` and ``name``
            for ``delete``; the leader's database and state files for ``load``; the kept
            arrays' ``names`` for ``free``).
        message: the wire message's class name (``CallRequest``...), when one follows.
    """

    kind: str
    seq: int
    session: str | None = None
    call_id: str | None = None
    keys: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    message: str | None = None


def check_mirrored(kind: str, where: str) -> None:
    if kind not in MIRRORED:
        raise GroupUnsupportedError(_MSG_NOT_MIRRORED.format(where=where, kind=kind))


# -- the leader ---------------------------------------------------------------------
@dataclass
class _Follower:
    index: int
    sock: socket.socket
    last_seen: float
    status: dict[str, Any] = field(default_factory=dict)
    lost: str | None = None
    gone: threading.Event = field(default_factory=threading.Event)  # its connection ended
    # Its shards for the leader's gathers (``Leader.receive``), in its order.
    shards: queue.SimpleQueue[tuple[dict[str, Any], memoryview | None]] = field(
        default_factory=queue.SimpleQueue)


class Leader:
    """The leader's side: the followers' connections, the broadcast and the heartbeats.

    ``on_lost(error)`` runs once, on the first loss (``Runtime`` fails what runs).
    """

    def __init__(self, settings: Settings, count: int,
                 on_lost: Callable[[ClusterUnavailableError], None] | None = None):
        self.settings = settings
        self.count = count
        self.on_lost = on_lost
        self.followers: dict[int, _Follower] = {}
        self.seq = 0
        self.sent = 0
        self.sent_bytes: Any = None  # a Counter of the bytes sent to followers (cli.py)
        self._local = threading.local()  # the seq of the op this thread last broadcast
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._lost_reported = False
        self._closed = threading.Event()
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        # Ops the sender thread writes, in order; ``_writing``: one is being written.
        self._outbox: collections.deque[tuple[ClusterOp, Any]] = collections.deque()
        self._wake = threading.Condition(self._send_lock)
        self._writing = False
        self._sender = threading.Thread(target=self._send, name="statehost-group-send",
                                        daemon=True)

    # -- meeting ----------------------------------------------------------------------
    def start(self) -> None:
        """Binds the stream's port, publishes it with a secret, and accepts followers."""
        host = (self.settings.coordinator or "").rpartition(":")[0].strip("[]") or \
            socket.gethostname()
        listener = socket.create_server(("", self.settings.cluster_port))
        self._listener = listener
        port = listener.getsockname()[1]
        self._secret = secrets.token_hex(32)
        kv = _kv()
        kv.key_value_set(_KEY_SECRET, self._secret)
        kv.key_value_set(_KEY_ADDRESS, f"{host}:{port}")
        log.info("group leader: waiting for %d follower(s) on %s:%d", self.count - 1, host,
                 port)
        threading.Thread(target=self._accept, name="statehost-group-accept",
                         daemon=True).start()
        threading.Thread(target=self._monitor, name="statehost-group-heartbeats",
                         daemon=True).start()
        self._sender.start()
        from statehost.server.placement import use_peers

        use_peers(self)

    def _accept(self) -> None:
        assert self._listener is not None
        while len(self.followers) < self.count - 1 and not self._closed.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            try:
                sock.settimeout(10.0)
                nonce = secrets.token_bytes(32)
                sock.sendall(nonce)
                hello, _ = read_message(sock)
                index = int(hello["process"])
                if not hmac.compare_digest(bytes(hello["mac"]), _mac(self._secret, nonce)) \
                        or not 0 < index < self.count or index in self.followers:
                    raise ValueError(f"bad hello from process {hello.get('process')!r}")
                sock.settimeout(None)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                send_message(sock, {"ok": True})
            except (OSError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as exc:
                log.warning("group leader: refused a connection (%s)", exc)
                sock.close()
                continue
            follower = _Follower(index, sock, time.monotonic())
            with self._lock:
                self.followers[index] = follower
            log.info("group leader: process %d joined", index)
            threading.Thread(target=self._read, args=(follower,), daemon=True,
                             name=f"statehost-group-read-{index}").start()
        self._listener.close()

    def _read(self, follower: _Follower) -> None:
        """Heartbeats and acknowledgements from one follower, until its connection ends."""
        try:
            while True:
                header, data = read_message(follower.sock)
                follower.last_seen = time.monotonic()
                if "shards" in header:
                    follower.shards.put((header, data))
                else:
                    follower.status = header
        except (OSError, ConnectionError, pickle.UnpicklingError, struct.error) as exc:
            if not self._stopping.is_set():
                self._lose(follower, f"its connection closed: {exc}")
        finally:
            follower.gone.set()

    def _monitor(self) -> None:
        bound = self.settings.heartbeat_timeout
        while not self._closed.wait(heartbeat_interval(self.settings) / 2):
            now = time.monotonic()
            for follower in list(self.followers.values()):
                if follower.lost is None and now - follower.last_seen > bound:
                    self._lose(follower, f"no heartbeat for {now - follower.last_seen:.1f} s, "
                                         f"more than the {bound:g} s bound")

    def _lose(self, follower: _Follower, why: str) -> None:
        with self._lock:
            if follower.lost is not None:
                return
            follower.lost = why
            first = not self._lost_reported
            self._lost_reported = True
        log.error("group leader: process %d lost: %s", follower.index, why)
        follower.shards.put(({"shards": None, "lost": why}, None))  # wakes a gather's wait
        try:
            follower.sock.close()
        except OSError:
            pass
        if first and self.on_lost is not None:
            self.on_lost(self.unavailable("a running call"))

    # -- state ------------------------------------------------------------------------
    def lost(self) -> dict[int, str]:
        return {f.index: f.lost for f in self.followers.values() if f.lost is not None}

    def problem(self) -> str | None:
        """Why the group cannot run operations now, or ``None``."""
        lost = self.lost()
        if lost:
            return "; ".join(f"process {i} lost: {why}" for i, why in sorted(lost.items()))
        if len(self.followers) < self.count - 1:
            return (f"forming: {len(self.followers)} of {self.count - 1} follower(s) "
                    "connected")
        return None

    def unavailable(self, where: str) -> ClusterUnavailableError:
        lost = self.lost()
        if not lost:
            return ClusterUnavailableError(_MSG_STARTING.format(
                where=where, count=self.count, have=len(self.followers),
                want=self.count - 1), processes=[])
        return ClusterUnavailableError(_MSG_LOST.format(
            where=where, processes=", ".join(map(str, sorted(lost))), count=self.count,
            why="; ".join(lost[i] for i in sorted(lost))), processes=sorted(lost))

    def check(self, where: str) -> None:
        """A 503 ``ClusterUnavailableError`` unless every follower is connected and alive."""
        if self.problem() is not None:
            raise self.unavailable(where)

    def processes(self) -> list[dict[str, Any]]:
        """Each process of the group: index, devices, health, heartbeat age."""
        import jax

        now = time.monotonic()
        rows = [{"index": 0, "role": "leader", "devices": [
            d.id for d in jax.devices() if d.process_index == 0], "health": "ok",
            "heartbeat_age_s": 0.0}]
        for index in range(1, self.count):
            follower = self.followers.get(index)
            rows.append({
                "index": index, "role": "follower",
                "devices": [d.id for d in jax.devices() if d.process_index == index],
                "health": "lost" if follower and follower.lost else
                          "ok" if follower else "not connected",
                "heartbeat_age_s": None if follower is None else
                round(now - follower.last_seen, 3),
                **({"reason": follower.lost} if follower and follower.lost else {}),
                **({"ops": follower.status.get("ops")} if follower else {}),
            })
        return rows

    # -- broadcasting -----------------------------------------------------------------
    def broadcast(self, kind: str, session: str | None, call_id: str | None = None,
                  keys: tuple[str, ...] = (), message: Any = None, where: str = "",
                  **extra: Any) -> None:
        """Sends one operation to every follower, in the one order (a 503 when one is
        lost: then nothing runs). A worker thread (the call's) writes a small one itself
        when nothing is queued before it: handing it to the sender thread costs a thread
        switch per op, which the GIL can hold up for milliseconds while the caller runs
        on. The event loop (closing a session) and large ones queue it for the sender
        thread, so that the loop never waits on a socket."""
        body = None if message is None else message.to_frame()
        inline = (body is None or body.nbytes < _INLINE_BYTES) and not _on_event_loop()
        with self._send_lock:
            self.check(where or kind)
            self.seq += 1
            self._local.seq = self.seq
            op = ClusterOp(kind, self.seq, session, call_id, tuple(keys), extra,
                           None if message is None else type(message).__name__)
            if not inline or self._writing or self._outbox:
                self._outbox.append((op, body))
                self._wake.notify()
                return
            self._writing = True
        self._write_turn(op, body)

    def _send(self) -> None:
        while True:
            with self._send_lock:
                while self._writing or not self._outbox:
                    self._wake.wait()
                op, body = self._outbox.popleft()
                self._writing = True
            self._write_turn(op, body)
            if op.kind == "stop":
                return

    def _write_turn(self, op: ClusterOp, body: Any) -> None:
        """Writes ``op`` (the caller took the writer's turn, ``_writing``), then gives the
        turn back and wakes the sender thread if ops are waiting."""
        try:
            self._write(op, body)
        finally:
            with self._send_lock:
                self._writing = False
                if self._outbox:
                    self._wake.notify()

    def _write(self, op: ClusterOp, body: Any) -> None:
        """``op`` to every follower not lost (its writer holds ``_writing``)."""
        head = encode_message(op, body)  # pickled once, whatever the followers' count
        for follower in list(self.followers.values()):
            if follower.lost is not None:
                continue
            try:
                sent = send_encoded(follower.sock, head, body)
            except OSError as exc:
                self._lose(follower, f"sending to it failed: {exc}")
                continue
            if self.sent_bytes is not None:
                self.sent_bytes.labels(str(follower.index)).inc(sent)
        self.sent += 1

    # -- results ----------------------------------------------------------------------
    def send(self, parts: list[list[tuple[Any, np.ndarray]]]) -> None:
        raise AssertionError("the leader receives shards; it sends none")

    def receive(self) -> list[list[list[tuple[Any, np.ndarray]]]]:
        """Every follower's shards for this gather (``server/placement.py``): the next
        message of each, for the op this thread broadcast last (older ones, of an op that
        failed here before its gather, are dropped). A 503 when a follower is lost."""
        want = getattr(self._local, "seq", None)
        out = []
        for index in sorted(self.followers):
            follower = self.followers[index]
            while True:
                try:
                    header, data = follower.shards.get(
                        timeout=heartbeat_interval(self.settings))
                except queue.Empty:
                    if not self._closed.is_set():
                        continue
                    header = {"shards": None, "lost": "the leader is closing"}
                if "lost" in header or follower.lost is not None:
                    raise self.unavailable("reading the results")
                if want is None or header["shards"] >= want:
                    break
            if "failed" in header and header["shards"] == want:
                raise RuntimeError(_MSG_FOLLOWER_FAILED.format(
                    index=index, seq=want, why=header["failed"]))
            if want is not None and header["shards"] > want:
                raise RuntimeError(_MSG_OUT_OF_STEP.format(index=index, want=want,
                                                           got=header["shards"]))
            out.append(_decode_shards(header["parts"], data))
        return out

    def wait_formed(self, timeout: float = _MEET_TIMEOUT_S) -> bool:
        """Waits until every follower joined (they come right after
        ``jax.distributed.initialize``, which every process passes together)."""
        deadline = time.monotonic() + timeout
        while len(self.followers) < self.count - 1:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def share_data(self, persistence: Any) -> None:
        """The group's first operation: the leader's database and state files, from which
        each follower reloads the same named states as the leader did (the leader alone
        keeps a data dir; followers keep a scratch copy)."""
        import sqlite3

        source = sqlite3.connect(f"file:{persistence.db_path}?mode=ro", uri=True)
        try:
            db = source.serialize()
        finally:
            source.close()
        files = {}
        for row in persistence.db.states():
            path = persistence.data_dir / row.file
            if path.is_file():
                files[row.file] = path.read_bytes()
        self.broadcast("load", None, where="reload", db=db, files=files)

    def close(self, wait: float = 15.0) -> None:
        """Tells the followers to stop (after what is queued) and waits for them to leave
        the coordination service, which lives in this process: a follower still in it
        when it goes aborts (jax 0.10.2: "Failed to disconnect from coordination service").
        """
        self._stopping.set()
        with self._send_lock:
            self.seq += 1
            self._outbox.append((ClusterOp("stop", self.seq), None))
            self._wake.notify()
        self._sender.join(timeout=wait)
        deadline = time.monotonic() + wait
        for follower in list(self.followers.values()):
            if follower.lost is None:
                follower.gone.wait(max(0.0, deadline - time.monotonic()))
        self._closed.set()
        from statehost.server.placement import use_peers

        use_peers(None)
        if self._listener is not None:
            self._listener.close()
        for follower in self.followers.values():
            try:
                follower.sock.close()
            except OSError:
                pass


_MSG_OUT_OF_STEP = (
    "process {index} sent its shards of operation {got} while the leader gathers the "
    "results of operation {want}: it skipped that gather (its run of the operation failed "
    "where the leader's did not). Nothing of this call is applied. Fix: restart the whole "
    "group; report it, with both processes' logs."
)


_MSG_FOLLOWER_FAILED = (
    "process {index} failed operation {seq} where the leader did not ({why}), so its "
    "shards of the results never come. Nothing of this call is applied. Fix: restart the "
    "whole group; report it, with both processes' logs."
)


def encode_shards(parts: list[list[tuple[Any, np.ndarray]]], seq: int
                  ) -> tuple[dict[str, Any], Buffers]:
    """A follower's shards as a message: their indices, dtypes and shapes in the header,
    their bytes as the body."""
    meta = [[(index, a.dtype, a.shape) for index, a in leaf] for leaf in parts]
    buffers = tuple(np.ascontiguousarray(a) for leaf in parts for _, a in leaf)
    return {"shards": seq, "parts": meta}, Buffers(buffers)


def _decode_shards(meta: list[list[tuple[Any, Any, tuple[int, ...]]]],
                   data: memoryview | None) -> list[list[tuple[Any, np.ndarray]]]:
    out = []
    offset = 0
    for leaf in meta:
        parts = []
        for index, dtype, shape in leaf:
            size = math.prod(shape) * np.dtype(dtype).itemsize
            assert data is not None or size == 0
            raw = data[offset:offset + size] if data is not None else b""
            parts.append((index, np.frombuffer(raw, dtype).reshape(shape)))
            offset += size
        out.append(parts)
    return out


_MSG_OTHER_COUNT = (
    "statehost serve: the data dir {data_dir} holds the named states of a group of "
    "{recorded} process(es) (recorded in {path}), and this server is {now}. A state's "
    "layout over the devices is tied to the group's processes, so it is not reloaded "
    "under another count. To migrate: 1. start the old setup again (--num-processes "
    "{recorded}) and pull what you keep (obj = client.get('ns/name'), client.pull(obj)); "
    "2. stop it, and start the new one on a fresh --data-dir; 3. put the objects there "
    "again (client.put('ns/name', obj))."
)
_PROCESSES_FILE = "processes"


def check_process_count(data_dir: Path, count: int) -> str | None:
    """A refusal (what to do) when ``data_dir`` was a group of another size; else records
    ``count`` there (a group's leader) and returns ``None``."""
    path = data_dir / _PROCESSES_FILE
    try:
        recorded = int(path.read_text().strip())
    except FileNotFoundError:
        recorded = None
    except ValueError:
        recorded = -1
    if recorded is not None and recorded != count:
        now = "a single process" if count == 1 else f"a group of {count}"
        return _MSG_OTHER_COUNT.format(data_dir=data_dir, recorded=recorded, path=path,
                                       now=now)
    if count > 1 and recorded is None:
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{count}\n")
    return None


def meet_leader(process: int, timeout: float = _MEET_TIMEOUT_S) -> socket.socket:
    """A follower's connection to the leader, authenticated (address and secret from the
    coordination service's key-value store)."""
    kv = _kv()
    ms = int(timeout * 1000)
    address = kv.blocking_key_value_get(_KEY_ADDRESS, ms)
    secret = kv.blocking_key_value_get(_KEY_SECRET, ms)
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    nonce = bytes(_read_exactly(sock, 32))
    send_message(sock, {"process": process, "mac": _mac(secret, nonce)})
    answer, _ = read_message(sock)
    if not answer.get("ok"):
        raise ConnectionError(f"the leader at {address} refused process {process}")
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
