"""The call stream: one client's ordered channel of frames, run in the order they came.

A client that dispatches asynchronously sends every request on one WebSocket
(``routes/stream.py``) without waiting for answers. A :class:`Channel` reads the
frames as they arrive and runs them one after another, so a call sees the
states the calls before it wrote, and answers each on the same socket (message
kinds: ``statehost.wire._stream``). What it guarantees:

- **Order.** Requests run in arrival order, one at a time per channel (calls of
  other clients run beside them, under the scheduler's state locks).
- **Failure stops the line.** After a call fails, the calls behind it answer
  ``CallNotRunError`` until the client sends ``resume`` (it does once the user
  has seen the failure), so no state moves past a failed call.
- **Exactly once.** A call id that committed before in the session is answered
  with that first reply (kept in ``Session.outcomes``), or awaited if it is
  still running: a call re-sent after a reconnect is never applied twice. A call
  that failed applied nothing, so a re-send of it runs again (and is refused
  again, or not, as the states are now).
- **Cancel** (``ControlRequest(op="cancel")``) acts at once, out of order:
  queued calls are dropped with ``CallCancelledError``; a running one is asked to
  stop between steps (one device program cannot be interrupted, openxla/xla#16801).
- **Runs of calls on one worker.** A call holds a worker and its states through the
  scheduler as any call does; while it runs, the calls queued behind it on the channel
  that need no other state run on the same worker, one after another, without a hop
  back to the event loop each (at most ``_RUN_CALLS`` of them, and none once another
  call waits in the scheduler's queue: a channel never keeps a worker or a state from
  anyone waiting for it).
- **Replies in batches.** Replies go out in the order the calls finished; those ready
  together leave in one WebSocket message, frames end to end (``wire.decode_all``
  reads them; a lone reply is a message of one frame, as before).
- **Bad input.** A frame that cannot be read closes the channel with code 1007
  and a reason (the client cannot know which request it was); a readable frame
  with bad fields gets an ``ErrorReply`` and the channel goes on. Either way the
  server keeps serving everyone else and every state stays unchanged.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

from statehost._errors import WireError
from statehost.server.admission import NotAdmitted
from statehost.server.calls import Call, CallCancelled, CallStatus
from statehost.server.deps import checked_frame
from statehost.server.errors import (
    ApiError,
    CallCancelledError,
    CallNotRunError,
    CallTimeoutError,
    PayloadTooLargeError,
    ProtocolError,
    ServerError,
    error_body,
)
from statehost.server.execution import run_call
from statehost.server.transfer import fetch_kept, pull_states
from statehost.wire import (
    CallRequest,
    ControlRequest,
    ErrorReply,
    FetchReply,
    FetchRequest,
    Frame,
    FreeRequest,
    Message,
    PullRequest,
    decode_all,
)

if TYPE_CHECKING:
    from statehost.server.auth import Principal
    from statehost.server.runtime import Runtime
    from statehost.server.store import Session

__all__ = ["Channel", "ChannelClosed"]

log = logging.getLogger("statehost.server")

WHERE = "WebSocket /v1/stream"
# Finished calls remembered per session for re-sends (their reply frames are small:
# stream calls keep their outputs on the server).
_OUTCOMES = 4096
# Requests read but not run yet; the client's own bound (max_in_flight) is far below.
_BACKLOG = 4096
# Calls run back to back on a worker the channel holds (see the module docstring), at
# most: after them, the worker goes back to the scheduler and the next call queues anew.
_RUN_CALLS = 64
# Replies smaller than this that are ready together share one WebSocket message.
_BATCH_BYTES = 64 << 10
# A run of calls holds back at most this many replies, none for longer than this while
# the next call runs: fewer, larger messages, at a bounded delay of an answer. Each message
# costs both event loops (this one's and the client's reader) ~50-100 us of CPU, and the
# client sends what it held back when a message of replies comes, so its requests batch
# as the replies do: with 2 ms, a tiny call (~1 ms) shared a message with one other; with
# 6 ms, with ~5 (event-loop CPU per call -25%, client reader -25%). A run ends when the
# queue is empty, so the last reply, the one a waiting client needs, is never held.
_HOLD_REPLIES = 16
_HOLD_SECONDS = 0.006
# After a call this long, the run ends: the hop to the loop is small beside it, and the
# loop reads the frames that came meanwhile (a cancel of the next calls) before they run.
_LONG_CALL = 0.02

_MSG_NOT_RUN = (
    "{where}: call {call_id} was not run, because call {failed} of this client failed before "
    "it (calls queued behind a failure do not run, so no state moves past the failed call). "
    "Every state is as the calls before {failed} left it. Fix: read the failure, then "
    "re-issue the calls you still want."
)
_MSG_TIMEOUT = (
    "{where}: call {call_id} has a timeout of {timeout:g} s and waited {waited:.3g} s behind "
    "this client's earlier calls, so it was never started: nothing was applied. Fix: give it "
    "a longer timeout= (client.jit(f, timeout=...)), or issue fewer calls ahead of it."
)
_MSG_UNJUDGED = (
    f"{WHERE}: a message of several frames whose versions this channel has not accepted; "
    "send a frame alone first."
)
_MSG_CANCELLED = (
    "{where}: call {call_id} was cancelled before it started (its client asked: Ctrl-C, or "
    "cancel()). Nothing was applied."
)


class ChannelClosed(Exception):
    """The channel must close: ``code`` and ``reason`` go in the WebSocket close frame."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


class Channel:
    """One client's stream. ``send`` writes one message (``bytes``) to the client."""

    def __init__(self, rt: Runtime, principal: Principal, versions: dict[str, object],
                 send: Callable[[bytes], Awaitable[None]]):
        self.rt = rt
        self.versions = versions
        self.principal = principal
        self._send = send
        self._loop = asyncio.get_running_loop()  # made on the loop, by the route
        self._loop_thread = threading.get_ident()
        # Each request with the time it arrived (a call's timeout counts from there).
        # Appended on the event loop; taken by ``run``, or by the worker running a run of
        # calls (``_run_calls``) while ``run`` awaits it, never by both at once.
        self._queue: collections.deque[tuple[Frame, float] | None] = collections.deque()
        self._ready = asyncio.Event()  # the queue got an item
        self._failed: str | None = None  # the call id the client has not resumed after
        self._judged: object = None  # the client's versions, once a frame passed with them
        self._cancelled: set[str] = set()
        self._current: Call | None = None
        self._closed = False
        # Replies waiting to be written (from any thread), and whether a writer task runs.
        self._outbox: list[bytes] = []
        self._out_lock = threading.Lock()
        self._writing = False
        m = rt.metrics  # the per-message counters, looked up once (labels() costs ~1 us)
        self._bytes_in = m.wire_bytes.labels("in", "stream")
        self._bytes_out = m.wire_bytes.labels("out", "stream")
        self._calls_ok = m.calls.labels("ok")
        self._cache_hits = m.function_cache.labels("hit")

    # -- reading -----------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Takes one message off the socket (one frame, or several end to end: a client
        sends requests that are ready together in one): a cancel acts now, anything else
        waits its turn.

        Raises :class:`ChannelClosed` for a message that cannot be read.
        """
        try:
            frames = decode_all(data)
        except WireError as exc:
            raise ChannelClosed(1007, f"{WHERE}: {exc}"[:120]) from exc
        for frame in frames:
            if frame.header.get("versions") != self._judged:
                self._judge(data, frame, len(frames))
        self._bytes_in.inc(len(data))
        limit = self.rt.settings.max_body
        for frame in frames:
            self._take(frame, len(data), limit)

    def _judge(self, data: bytes, frame: Frame, count: int) -> None:
        """The versions rule (``deps.checked_frame``), judged once per channel: later frames
        that carry the same versions pass at once."""
        if count > 1:
            raise ChannelClosed(1007, _MSG_UNJUDGED)
        try:
            checked_frame(data, self.versions, WHERE)
        except ApiError as exc:
            raise ChannelClosed(1007, exc.message[:120]) from exc
        self._judged = frame.header.get("versions")

    def _take(self, frame: Frame, size: int, limit: int) -> None:
        if size > limit:
            if frame.header.get("kind") == CallRequest.kind:
                self._failed = self._failed or str(frame.header.get("call_id"))
            self._answer_later(frame, PayloadTooLargeError(
                f"{WHERE}: a message of {size} bytes is over this server's limit of "
                f"{limit} bytes (max_body); it was not run. Fix: send less per call, or start "
                "the server with a larger --max-body.", limit=limit))
            return
        if frame.header.get("kind") == ControlRequest.kind:
            control = self._decode(ControlRequest, frame)
            if control is not None and control.op == "cancel":
                self._cancel(set(control.ids))
                return
        if len(self._queue) >= _BACKLOG:
            raise ChannelClosed(1008, f"{WHERE}: more than {_BACKLOG} requests are waiting; "
                                "the client must wait for answers (max_in_flight).")
        self._queue.append((frame, time.monotonic()))
        self._ready.set()

    def _decode(self, cls: type[Message], frame: Frame) -> Any:
        try:
            return cls.from_frame(frame)
        except WireError as exc:
            self._answer_later(frame, ProtocolError(f"{WHERE}: {exc}"))
            return None

    def _answer_later(self, frame: Frame, exc: ApiError) -> None:
        call_id = frame.header.get("call_id")
        reply = ErrorReply(call_id=call_id if isinstance(call_id, str) else None,
                           status=exc.status, error=exc.body()["error"])
        self._post(reply.to_frame().to_bytes())

    def _cancel(self, ids: set[str]) -> None:
        self._cancelled |= ids
        current = self._current
        if current is not None and current.id in ids:
            current.request_cancel()  # a running loop stops after its step

    def close(self) -> None:
        """The socket is gone: calls not started are dropped; a running one finishes."""
        self._closed = True
        self._queue.append(None)
        self._ready.set()

    # -- running -----------------------------------------------------------------------
    async def run(self) -> None:
        """Runs the requests in order until :meth:`close`."""
        queue = self._queue
        while True:
            if not queue:
                self._ready.clear()
                await self._ready.wait()
                continue
            item = queue.popleft()
            if item is None or self._closed:
                return
            await self._one(*item)

    async def _one(self, frame: Frame, arrived: float) -> None:
        kind = frame.header.get("kind")
        handler = self._HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            self._answer_later(frame, ProtocolError(
                f"{WHERE}: unknown message kind {kind!r}; the stream takes "
                f"{sorted(self._HANDLERS)}. Fix: use statehost's client of the server's version."))
            return
        cls, method = handler
        message = self._decode(cls, frame)
        if message is None:
            return
        try:  # a call's timeout counts from its arrival: only _call takes it
            reply = await (self._call(message, arrived) if cls is CallRequest
                           else method(self, message))
        except ApiError as exc:
            if cls is CallRequest:  # a call that could not even start stops the line too
                self._failed = message.call_id or "(no id)"
            self._post(self._error(getattr(message, "call_id", None), exc))
            return
        except Exception as exc:  # a fault of the server: answered, and the channel goes on
            log.exception("%s: a %s request failed in the server", WHERE, kind)
            if cls is CallRequest:
                self._failed = message.call_id or "(no id)"
            self._post(self._error(getattr(message, "call_id", None), ServerError(
                f"{WHERE}: the server failed on this {kind} request ({type(exc).__name__}: "
                f"{exc}); nothing was applied.")))
            return
        if reply is not None:
            self._post(reply)

    # -- writing -----------------------------------------------------------------------
    def _post(self, *replies: bytes) -> None:
        """Queues replies for the client (any thread); a writer task on the loop sends them."""
        with self._out_lock:
            self._outbox.extend(replies)
            if self._writing:
                return
            self._writing = True
        try:
            if threading.get_ident() == self._loop_thread:
                self._start_writer()
            else:
                self._loop.call_soon_threadsafe(self._start_writer)
        except RuntimeError:  # the loop is closed: nobody reads any more
            pass

    def _start_writer(self) -> None:
        self._loop.create_task(self._write_outbox())

    async def _write_outbox(self) -> None:
        while True:
            with self._out_lock:
                replies, self._outbox = self._outbox, []
                if not replies:
                    self._writing = False
                    return
            for message in _messages(replies):
                await self._write(message)

    async def _write(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            await self._send(data)
        except Exception:  # the socket closed under us: close() follows from the reader
            return
        self._bytes_out.inc(len(data))

    def _session(self, session_id: str) -> Session:
        return self.rt.session(session_id, self.principal, WHERE)

    # -- the requests --------------------------------------------------------------------
    async def _call(self, message: CallRequest, arrived: float) -> bytes | None:
        """A call from the queue (on the loop): answered at once when its outcome is known
        (a re-send, a call behind a failure, a cancelled or timed-out one), else run on a
        worker with the calls queued behind it that it can take (``_run_calls``)."""
        session = self._session(message.session)
        call_id = message.call_id
        if not call_id:
            raise ProtocolError(f"{WHERE}: a call on the stream needs a call_id (the client's, "
                                "unique in its session).")
        done = session.outcomes.get(call_id)
        if done is not None:
            return done  # a re-send: the first outcome, never a second run
        running = session.running.get(call_id)
        if running is not None:  # re-sent on a new channel while the first still runs
            return await asyncio.shield(asyncio.wrap_future(running))
        answer = self._gate(message, arrived)
        if isinstance(answer, bytes):
            return answer
        keys, timeout = answer
        outcome = session.running[call_id] = concurrent.futures.Future()
        work = Call("call", session, keys, lambda c: self._run_calls(c, message, outcome),
                    id=call_id, timeout=timeout)
        m = self.rt.metrics
        try:
            await self.rt.submit(work, WHERE)  # refused first past the namespace's max_queued
        except CallCancelled:  # before it started
            m.calls.labels("cancelled").inc()
            data = self._error(call_id, CallCancelledError(
                _MSG_CANCELLED.format(where=WHERE, call_id=call_id)))
        except ApiError as exc:  # its deadline passed in the scheduler's queue
            m.calls.labels("stream_error").inc()
            self._failed = call_id
            data = self._error(call_id, exc)
        else:
            return None  # _run_calls answered it
        if not outcome.done():
            session.running.pop(call_id, None)
            outcome.set_result(data)
        return data

    def _gate(self, message: CallRequest, arrived: float
              ) -> bytes | tuple[tuple[str, ...], float | None]:
        """A call's answer when it must not run (behind a failure, cancelled, past its
        timeout), else the states it locks and the time it has left."""
        call_id = message.call_id
        if self._failed is not None:
            return self._error(call_id, CallNotRunError(_MSG_NOT_RUN.format(
                where=WHERE, call_id=call_id, failed=self._failed)))
        if call_id in self._cancelled:
            self._cancelled.discard(call_id)
            self.rt.metrics.calls.labels("cancelled").inc()
            return self._error(call_id, CallCancelledError(
                _MSG_CANCELLED.format(where=WHERE, call_id=call_id)))
        timeout = message.timeout
        if timeout is not None:  # it counts from arrival, the calls before it included
            waited = time.monotonic() - arrived
            if waited >= timeout:
                self._failed = call_id
                self.rt.metrics.call_timeouts.inc()
                return self._error(call_id, CallTimeoutError(_MSG_TIMEOUT.format(
                    where=WHERE, call_id=call_id, timeout=timeout, waited=waited),
                    waited_s=round(waited, 3), timeout_s=timeout))
            timeout -= waited
        return _keys(message), timeout

    def _run_calls(self, held: Call, first: CallRequest,
                   outcome: concurrent.futures.Future[bytes]) -> None:
        """On a worker holding ``held``'s states: runs ``first``, then the calls queued
        behind it that lock no other state, until one fails, the queue has none, another
        call waits in the scheduler, a call took longer than ``_LONG_CALL`` (what came
        meanwhile, a cancel say, is read on the loop before the next call starts), or
        ``_RUN_CALLS`` ran. Their replies leave together
        (at most ``_HOLD_REPLIES``, none held longer than ``_HOLD_SECONDS`` while the next
        call runs), and all of them when the run ends."""
        began = time.monotonic()
        replies = [self._execute(held, first, outcome)]
        ended = time.monotonic()
        held_since = began  # when the oldest reply held back was made
        session = held.session
        assert session is not None
        keys = frozenset(held.keys)
        scheduler = self.rt.scheduler
        try:
            for _ in range(_RUN_CALLS - 1):
                if self._failed is not None or self._closed or scheduler.waiting \
                        or ended - began > _LONG_CALL:
                    return
                taken = self._next_call(session, keys)
                if taken is None:
                    return
                began = time.monotonic()
                if replies and (len(replies) >= _HOLD_REPLIES
                                or began - held_since > _HOLD_SECONDS):
                    self._post(*replies)
                    replies = []
                if not replies:
                    held_since = began
                message, arrived, item = taken
                answer = self._gate(message, arrived)
                if isinstance(answer, bytes):
                    replies.append(answer)
                    ended = began
                    continue
                # Its own Call (id, timeout, keys, cancel flag) that runs under held's locks;
                # the scheduler never sees it, so its work is never called.
                call = Call("call", session, answer[0], held.work, id=message.call_id,
                            timeout=answer[1])
                call.begin(began)
                outcome = session.running[message.call_id] = concurrent.futures.Future()
                try:
                    replies.append(self._execute(call, message, outcome))
                except NotAdmitted:  # it must wait for memory: through the scheduler, as
                    session.running.pop(message.call_id, None)  # the first of a new run
                    self._queue.appendleft(item)
                    return
                ended = call.finished = time.monotonic()
                call.status = CallStatus.FAILED if self._failed == call.id \
                    else CallStatus.COMMITTED
                if scheduler.calls.history is not None:  # the dashboard's recent calls
                    scheduler.calls.history.record(call)
        finally:
            self._post(*replies)

    def _next_call(self, session: Session, keys: frozenset[str]
                   ) -> tuple[CallRequest, float, Any] | None:
        """The next request, taken off the queue if it is a call this worker may run now
        (same session, no other state, not re-sent); else None and it stays for ``run``."""
        try:
            item = self._queue[0]
        except IndexError:
            return None
        if item is None or item[0].header.get("kind") != CallRequest.kind:
            return None
        try:
            message = CallRequest.from_frame(item[0])
        except WireError:
            return None  # run() answers it
        call_id = message.call_id
        if message.session != session.id or not call_id or not keys.issuperset(
                _keys(message)) or call_id in session.outcomes or call_id in session.running:
            return None
        try:  # still open (and seen now, as every call's session is)
            self._session(message.session)
        except ApiError:
            return None  # run() answers it
        self._queue.popleft()
        return message, item[1], item

    def _execute(self, call: Call, message: CallRequest,
                 outcome: concurrent.futures.Future[bytes]) -> bytes:
        """Runs one call on this worker; returns its reply (nothing here raises)."""
        session = call.session
        assert session is not None
        call_id = call.id
        m = self.rt.metrics
        self._current = call
        start = time.perf_counter()
        try:
            result = run_call(call, message, self.rt)
        except NotAdmitted:  # does not fit in device memory now: back to the scheduler
            raise
        except ApiError as exc:
            m.calls.labels("stream_error").inc()
            self._failed, call.error = call_id, exc
            data = self._error(call_id, exc)
        except Exception as exc:
            log.exception("%s: call %s failed in the server", WHERE, call_id)
            self._failed, call.error = call_id, exc
            fault = ServerError(f"{WHERE}: call {call_id}: the server failed ({type(exc).__name__}"
                                f": {exc}). The call was not applied.")
            data = self._error(call_id, fault)
        else:
            self._calls_ok.inc()
            if result.cached:
                self._cache_hits.inc()
            else:
                m.function_cache.labels("miss").inc()
            data = self._remember(session, call_id, result.reply.to_frame().to_bytes())
        finally:
            self._current = None
            m.call_seconds.observe(time.perf_counter() - start)
        # The outcome is remembered before the call stops being "running": a re-send on
        # another channel finds one or the other.
        session.running.pop(call_id, None)
        outcome.set_result(data)
        return data

    def _error(self, call_id: str | None, exc: ApiError) -> bytes:
        return ErrorReply(call_id=call_id, status=exc.status,
                          error=exc.body()["error"]).to_frame().to_bytes()

    @staticmethod
    def _remember(session: Session, call_id: str, data: bytes) -> bytes:
        session.outcomes[call_id] = data
        while len(session.outcomes) > _OUTCOMES:
            session.outcomes.popitem(last=False)
        return data

    async def _pull(self, message: PullRequest) -> bytes:
        session = self._session(message.session)
        reply = await self.rt.submit(
            Call("pull", session, message.ids, lambda c: pull_states(c, message, self.rt)),
            WHERE)
        return dataclasses.replace(reply, call_id=message.call_id).to_frame().to_bytes()

    async def _fetch(self, message: FetchRequest) -> bytes:
        session = self._session(message.session)

        def fetch(call: Call) -> FetchReply:
            return fetch_kept(call, message, self.rt, WHERE)  # server/transfer.py

        reply = await self.rt.submit(Call("fetch", session, (), fetch), WHERE)
        return reply.to_frame().to_bytes()

    async def _free(self, message: FreeRequest) -> None:
        session = self._session(message.session)
        self.rt.free_handles(session, message.handles)

    async def _control(self, message: ControlRequest) -> None:
        self._session(message.session)
        if message.op == "resume":
            self._failed = None
        elif message.op != "cancel":
            raise ProtocolError(f"{WHERE}: control op {message.op!r} is not one of "
                                "'cancel', 'resume'.")

    _HANDLERS: dict[str, tuple[type[Message], Callable[..., Awaitable[Any]]]] = {
        CallRequest.kind: (CallRequest, _call),
        PullRequest.kind: (PullRequest, _pull),
        FetchRequest.kind: (FetchRequest, _fetch),
        FreeRequest.kind: (FreeRequest, _free),
        ControlRequest.kind: (ControlRequest, _control),
    }


def _keys(message: CallRequest) -> tuple[str, ...]:
    """The states a call locks: those it names, uploads, and its default random stream."""
    return (*message.refs, *message.uploads, *filter(None, [message.default_stream]))


def _messages(replies: list[bytes]) -> Iterator[bytes]:
    """Replies as WebSocket messages: consecutive small ones joined, frames end to end."""
    batch: list[bytes] = []
    size = 0
    for data in replies:
        if batch and size + len(data) > _BATCH_BYTES:
            yield b"".join(batch)
            batch, size = [], 0
        batch.append(data)
        size += len(data)
    if batch:
        yield b"".join(batch)


def error_frame(exc: ApiError) -> bytes:
    """An ``ErrorReply`` for a failure that belongs to no request (``call_id`` null)."""
    return ErrorReply(call_id=None, status=exc.status,
                      error=error_body(exc.type, exc.message)["error"]).to_frame().to_bytes()
