"""A follower of a server group: replays the leader's operations on a mirror ``Runtime``.

A follower (process ``I > 0`` of ``statehost serve --coordinator ...``) serves no API: its
``GET /v1/health`` (a stdlib HTTP server on ``--port``, for orchestrators' probes) says
whether it follows, how many operations it applied, and which of its devices hold each
resident state. It meets the leader through the coordination service
(``cluster.meet_leader``), then applies each operation of the leader's stream in order, on
one thread, through the same service functions the leader ran, with the leader's ids; the
leader has checked them first, so an operation fails here only where it failed there.
A loop comes as its start (``loop``), then one ``step`` per step the leader runs, then its
end (``loop_end``): the leader alone decides how many steps run (``server/cluster.py``).

Its mirror runtime keeps the sessions and states the leader's operations make. Its
database (the named objects' names and versions) is a scratch copy in
``<data dir>/follower-mirror``, emptied at each start: named states are not persisted in a
group yet, and the leader's quotas and admission have already been applied.

A heartbeat (its counts) goes to the leader every ``cluster.heartbeat_interval``. When the
leader's stream ends (the leader stopped, or died), the follower exits: 0 when the leader
said stop, 3 when it was lost.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from statehost.server.cluster import (
    ClusterOp,
    encode_shards,
    heartbeat_interval,
    meet_leader,
    read_message,
    send_message,
)
from statehost.server.persistence.permissions import make_private_dir
from statehost.server.settings import Settings

__all__ = ["Follower", "serve_follower"]

log = logging.getLogger("statehost.server")

_EXIT_LEADER_LOST = 3


def _never(call: Any) -> Any:
    raise AssertionError("a follower's calls run outside its scheduler")


class Follower:
    """The mirror runtime and the loop that applies the leader's operations."""

    def __init__(self, settings: Settings, index: int, count: int):
        from statehost.server.runtime import Runtime

        self.index, self.count = index, count
        scratch = settings.data_dir / "follower-mirror"
        shutil.rmtree(scratch, ignore_errors=True)
        mirror = dataclasses.replace(
            settings, data_dir=scratch, device_memory=None, default_max_bytes=None,
            default_max_bytes_per_device=None, default_max_sessions=None,
            default_max_queued=None)
        self.rt = Runtime(mirror)  # its persistence opens with the leader's data ("load")
        self.sessions: dict[str, Any] = {}
        self.ops = 0
        self.kinds: dict[str, int] = {}  # the operations applied, by kind
        self.failed = 0
        self.last: dict[str, Any] = {}
        self.applying: dict[str, Any] = {}  # the operation running now
        self.leader = "connecting"
        self._send_lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.seq = 0  # the operation it applies (its shards carry it: cluster.py)
        self.loops: dict[str, Any] = {}  # the loops it runs, by job id (server/loops.py)

    # -- what it reports ----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        import jax

        from statehost.server.placement import resident_shards

        states = resident_shards(self.rt.store)
        return {"status": "ok" if self.leader == "following" else "unhealthy",
                "role": "follower", "process_index": self.index, "process_count": self.count,
                "leader": self.leader, "ops": self.ops, "kinds": dict(self.kinds),
                "failed": self.failed, "last_op": self.last, "applying": self.applying,
                "sessions": len(self.sessions), "loops": len(self.loops),
                "kept_arrays": sum(len(s.handles) for s in list(self.sessions.values())),
                "devices": [d.id for d in jax.local_devices()], "states": states}

    def _heartbeats(self) -> None:
        period = heartbeat_interval(self.rt.settings)
        last = time.monotonic()
        while self.sock is not None:
            try:
                with self._send_lock:
                    send_message(self.sock, {"ops": self.ops, "failed": self.failed})
            except OSError:
                return
            time.sleep(period)
            now = time.monotonic()
            if now - last > 4 * period:  # this process is starved: the leader may lose it
                log.warning("group follower %d: heartbeat %.1f s late", self.index,
                            now - last - period)
            last = now

    # -- results (server/placement.py's PeerShards) --------------------------------------
    def send(self, parts: list[list[Any]]) -> None:
        """Its shards of the arrays the leader gathers now, on the leader's connection."""
        header, body = encode_shards(parts, self.seq)
        assert self.sock is not None
        with self._send_lock:
            send_message(self.sock, header, body)

    def _failed(self, seq: int, why: str) -> None:
        """Tells the leader that op ``seq`` failed here: a gather of it it waits in ends
        (the same failure on the leader never gathers, and the note is dropped)."""
        if self.sock is None:
            return
        try:
            with self._send_lock:
                send_message(self.sock, {"shards": seq, "parts": [], "failed": why})
        except OSError:
            pass

    def receive(self) -> list[Any]:
        raise AssertionError("a follower sends its shards; the leader receives them")

    # -- following ----------------------------------------------------------------------
    def run(self) -> int:
        from statehost.server.placement import use_peers

        self.sock = meet_leader(self.index)
        self.leader = "following"
        use_peers(self)
        log.info("group follower %d: following the leader", self.index)
        threading.Thread(target=self._heartbeats, name="statehost-heartbeat",
                         daemon=True).start()
        while True:
            try:
                op, data = read_message(self.sock)
            except (OSError, ConnectionError) as exc:
                self.leader = "lost"
                log.error("group follower %d: the leader is lost (%s); exiting", self.index,
                          exc)
                return _EXIT_LEADER_LOST
            if op.kind == "stop":
                self.leader = "stopped"
                log.info("group follower %d: the leader stopped", self.index)
                import jax

                jax.distributed.shutdown()  # while the leader's coordination service is up
                self.sock.close()
                return 0
            self.apply(op, data)

    def apply(self, op: ClusterOp, data: memoryview | None) -> None:
        """Runs one operation; its failure (the same as the leader's) is only counted."""
        self.applying = {"seq": op.seq, "kind": op.kind}
        self.seq = op.seq
        try:
            self._apply(op, data)
        except BaseException as exc:
            self.failed += 1
            self.last = {"seq": op.seq, "kind": op.kind, "error": type(exc).__name__,
                         "message": str(exc)[:300]}
            log.debug("group follower %d: op %d (%s) failed: %s", self.index, op.seq,
                      op.kind, exc)
            self._failed(op.seq, f"{type(exc).__name__}: {str(exc)[:300]}")
        else:
            self.last = {"seq": op.seq, "kind": op.kind}
        self.applying = {}
        self.kinds[op.kind] = self.kinds.get(op.kind, 0) + 1
        self.ops += 1

    def _loop(self, op: ClusterOp, call: Any, message: Any) -> Any:
        """A loop's operation: its start, one step, or its end, in the leader's order: the
        leader alone decides how many steps run (server/loops.py)."""
        from statehost.server.loops import LoopRun

        if op.kind == "loop":
            run = LoopRun(call, message, self.rt)
            run.begin()
            self.loops[call.id] = run
            return None
        run = self.loops.get(call.id) if op.kind == "step" else self.loops.pop(call.id, None)
        if run is None:
            if op.kind == "loop_end":
                return None  # its start failed here as on the leader: nothing to end
            raise RuntimeError(_MSG_NO_LOOP.format(seq=op.seq, kind=op.kind, job=call.id))
        if op.kind == "step":
            return run.step(op.extra["step"])
        return run.reply() if op.extra["reply"] else run.end()

    def _apply(self, op: ClusterOp, data: memoryview | None) -> Any:
        from statehost import wire
        from statehost.server.calls import Call
        from statehost.server.execution import run_call
        from statehost.server.named import get_object, put_object
        from statehost.server.registered import find, invoke_registered, register
        from statehost.server.store import Session
        from statehost.server.transfer import fetch_kept, pull_states, push_states

        rt = self.rt
        if op.kind == "load":  # the first operation: the leader's database and files
            scratch = rt.settings.data_dir
            make_private_dir(scratch)
            (scratch / "statehost.db").write_bytes(op.extra["db"])
            for name, data in op.extra["files"].items():
                path = scratch / name
                make_private_dir(path.parent)
                path.write_bytes(data)
            rt.persistence.open()
            return rt.persistence.reload(rt.store)
        if op.kind == "durability":  # between the same two operations as the leader's
            return rt.persistence.set_durability(op.extra["namespace"], op.extra["durability"])
        if op.kind == "flush":
            return rt.persistence.flush(list(op.keys))
        if op.kind == "free":  # arrays a session kept (the call stream's outputs)
            kept = self.sessions.get(op.session)
            for name in op.extra["names"] if kept is not None else ():
                kept.handles.pop(name, None)
            return None
        if op.kind == "open":
            now = time.monotonic()
            self.sessions[op.session] = Session(op.session, now, now, op.extra["principal"],
                                                client=op.extra.get("client", ""))
            return None
        if op.kind == "close":
            session = self.sessions.pop(op.session, None)
            return None if session is None else rt.free(session)
        message = None
        if op.message is not None:
            assert data is not None
            message = getattr(wire, op.message).from_frame(wire.decode(data))
        session = self.sessions.get(op.session) if op.session else None
        call = Call(op.kind, session, op.keys, _never, id=op.call_id or "")
        call.keys = op.keys  # the leader's, as it sent them (sorted there)
        if op.kind == "call":
            return run_call(call, message, rt)
        if op.kind in ("loop", "step", "loop_end"):
            return self._loop(op, call, message)
        if op.kind == "push":
            return push_states(call, message, rt)
        if op.kind == "pull":
            return pull_states(call, message, rt)
        if op.kind == "put":
            return put_object(call, message, rt)
        if op.kind == "get":
            return get_object(call, op.extra["obj"], op.extra["pull"], rt)
        if op.kind == "delete":
            deleted = rt.registry.delete(op.extra["namespace"], op.extra["name"])
            rt.functions.evict_states(deleted)
            return deleted
        if op.kind == "register":
            return register(call, message, rt)
        if op.kind == "invoke":  # a JSON request's one-off session, as the leader had it
            call.session = Session(op.session or "", time.monotonic(), time.monotonic(),
                                   op.extra["principal"], client=op.extra["client"])
            where = f"POST /v1/namespaces/{op.extra['namespace']}/functions/" \
                    f"{op.extra['name']}/invoke"
            row = find(rt, op.extra["namespace"], op.extra["name"], where)
            return invoke_registered(call, row, op.extra["args"], op.extra["kwargs"], rt,
                                     where)
        if op.kind in ("read", "write"):  # the JSON value API (server/routes/values.py)
            from statehost.server.routes.values import read_value, write_value

            state = rt.store.by_id(op.extra["state"])
            if op.kind == "read":
                return read_value(state, "GET .../value")
            call.session = Session(op.session or "", time.monotonic(), time.monotonic(),
                                   op.extra["principal"], client=op.extra["client"])
            return write_value(call, state, op.extra["array"], rt, "PUT .../value")
        if op.kind == "fetch":
            return fetch_kept(call, message, rt, "fetch")
        raise ValueError(f"unknown operation {op.kind!r}")


_MSG_NO_LOOP = (
    "group follower: the leader's operation {seq} ({kind} of job {job}) is for a loop this "
    "process is not running: its start (operation 'loop') failed here and not on the "
    "leader, so the two diverged. Fix: restart the whole group; report it, with both "
    "processes' logs."
)


def serve_follower(settings: Settings, index: int, count: int) -> int:
    """Follows the leader until it stops; answers ``GET /v1/health`` meanwhile."""
    follower = Follower(settings, index, count)

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] != "/v1/health":
                self._answer(404, {"error": {"type": "NotFoundError", "message": (
                    f"GET {self.path}: a follower of a server group (process {index}) "
                    "serves only GET /v1/health; the leader (process 0) serves the API.")}})
                return
            body = follower.status()
            self._answer(200 if body["status"] == "ok" else 503, body)

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((settings.host, settings.port), Health)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="statehost-follower-health",
                     daemon=True).start()
    print(f"statehost serve: follower {index} of {count}; health on "
          f"http://{settings.host}:{settings.port}/v1/health", flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        status = follower.run()
    finally:
        server.shutdown()
    if status == _EXIT_LEADER_LOST:  # JAX's exit would abort, the coordinator being gone
        logging.shutdown()
        os._exit(status)
    return status
