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
- **Bad input.** A frame that cannot be read closes the channel with code 1007
  and a reason (the client cannot know which request it was); a readable frame
  with bad fields gets an ``ErrorReply`` and the channel goes on. Either way the
  server keeps serving everyone else and every state stays unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import jax

from statehost._errors import WireError
from statehost.server.calls import Call, CallCancelled
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
from statehost.server.transfer import pull_states
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
    pack,
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
    """One client's stream. ``send`` writes one frame (``bytes``) to the client."""

    def __init__(self, rt: Runtime, principal: Principal, versions: dict[str, object],
                 send: Callable[[bytes], Awaitable[None]]):
        self.rt = rt
        self.versions = versions
        self.principal = principal
        self._send = send
        # Each request with the time it arrived (a call's timeout counts from there).
        self._queue: asyncio.Queue[tuple[Frame, float] | None] = asyncio.Queue()
        self._failed: str | None = None  # the call id the client has not resumed after
        self._cancelled: set[str] = set()
        self._current: Call | None = None
        self._closed = False
        self._arrived = 0.0  # when the request being run arrived
        m = rt.metrics  # the per-message counters, looked up once (labels() costs ~1 us)
        self._bytes_in = m.wire_bytes.labels("in", "stream")
        self._bytes_out = m.wire_bytes.labels("out", "stream")
        self._calls_ok = m.calls.labels("ok")
        self._cache_hits = m.function_cache.labels("hit")

    # -- reading -----------------------------------------------------------------------
    def receive(self, data: bytes) -> None:
        """Takes one frame off the socket: a cancel acts now, anything else waits its turn.

        Raises :class:`ChannelClosed` for a frame that cannot be read.
        """
        try:
            frame = checked_frame(data, self.versions, WHERE)
        except ApiError as exc:
            raise ChannelClosed(1007, exc.message[:120]) from exc
        self._bytes_in.inc(len(data))
        limit = self.rt.settings.max_body
        if len(data) > limit:
            if frame.header.get("kind") == CallRequest.kind:
                self._failed = self._failed or str(frame.header.get("call_id"))
            self._answer_later(frame, PayloadTooLargeError(
                f"{WHERE}: a message of {len(data)} bytes is over this server's limit of "
                f"{limit} bytes (max_body); it was not run. Fix: send less per call, or start "
                "the server with a larger --max-body.", limit=limit))
            return
        if frame.header.get("kind") == ControlRequest.kind:
            control = self._decode(ControlRequest, frame)
            if control is not None and control.op == "cancel":
                self._cancel(set(control.ids))
                return
        if self._queue.qsize() >= _BACKLOG:
            raise ChannelClosed(1008, f"{WHERE}: more than {_BACKLOG} requests are waiting; "
                                "the client must wait for answers (max_in_flight).")
        self._queue.put_nowait((frame, time.monotonic()))

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
        asyncio.get_running_loop().create_task(self._write(reply.to_frame().to_bytes()))

    def _cancel(self, ids: set[str]) -> None:
        self._cancelled |= ids
        current = self._current
        if current is not None and current.id in ids:
            request = getattr(current, "request_cancel", None)
            if request is not None:
                request()  # a running loop stops after its step
            else:
                current.cancel()

    def close(self) -> None:
        """The socket is gone: calls not started are dropped; a running one finishes."""
        self._closed = True
        self._queue.put_nowait(None)

    # -- running -----------------------------------------------------------------------
    async def run(self) -> None:
        """Runs the requests in order until :meth:`close`."""
        while True:
            item = await self._queue.get()
            if item is None or self._closed:
                return
            self._arrived = item[1]
            await self._one(item[0])

    async def _one(self, frame: Frame) -> None:
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
        try:
            reply = await method(self, message)
        except ApiError as exc:
            if cls is CallRequest:  # a call that could not even start stops the line too
                self._failed = message.call_id or "(no id)"
            await self._write(ErrorReply(call_id=getattr(message, "call_id", None),
                                         status=exc.status, error=exc.body()["error"]
                                         ).to_frame().to_bytes())
            return
        except Exception as exc:  # a fault of the server: answered, and the channel goes on
            log.exception("%s: a %s request failed in the server", WHERE, kind)
            if cls is CallRequest:
                self._failed = message.call_id or "(no id)"
            await self._write(self._error(getattr(message, "call_id", None), ServerError(
                f"{WHERE}: the server failed on this {kind} request ({type(exc).__name__}: "
                f"{exc}); nothing was applied.")))
            return
        if reply is not None:
            await self._write(reply)

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
    async def _call(self, message: CallRequest) -> bytes | None:
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
            return await asyncio.shield(running)
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
            waited = time.monotonic() - self._arrived
            if waited >= timeout:
                self._failed = call_id
                self.rt.metrics.call_timeouts.inc()
                return self._error(call_id, CallTimeoutError(_MSG_TIMEOUT.format(
                    where=WHERE, call_id=call_id, timeout=timeout, waited=waited),
                    waited_s=round(waited, 3), timeout_s=timeout))
            timeout -= waited
        keys = (*message.refs, *message.uploads, *filter(None, [message.default_stream]))
        work = Call("call", session, keys, lambda c: run_call(c, message, self.rt), id=call_id,
                    timeout=timeout)
        outcome = session.running[call_id] = asyncio.get_running_loop().create_future()
        try:
            data = await self._submit(session, work)
        finally:
            del session.running[call_id]
        outcome.set_result(data)
        return data

    async def _submit(self, session: Session, work: Call) -> bytes:
        call_id = work.id
        self._current = work
        m = self.rt.metrics
        start = time.perf_counter()
        try:
            result = await self.rt.submit(work, WHERE)
        except CallCancelled:
            m.calls.labels("cancelled").inc()
            data = self._error(call_id, CallCancelledError(
                _MSG_CANCELLED.format(where=WHERE, call_id=call_id)))
        except ApiError as exc:
            m.calls.labels("stream_error").inc()
            self._failed = call_id
            data = self._error(call_id, exc)
        except Exception as exc:
            log.exception("%s: call %s failed in the server", WHERE, call_id)
            self._failed = call_id
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
            arrays = [session.kept(name, WHERE) for name in message.handles]
            weak = tuple(isinstance(a, jax.Array) and jax.typeof(a).weak_type for a in arrays)
            values = jax.device_get(arrays)
            return FetchReply(call_id=message.call_id, weak_types=weak,
                              values=pack(values, refs=False, code=False))

        reply = await self.rt.submit(Call("fetch", session, (), fetch), WHERE)
        return reply.to_frame().to_bytes()

    async def _free(self, message: FreeRequest) -> None:
        session = self._session(message.session)
        for name in message.handles:
            session.handles.pop(name, None)

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


def error_frame(exc: ApiError) -> bytes:
    """An ``ErrorReply`` for a failure that belongs to no request (``call_id`` null)."""
    return ErrorReply(call_id=None, status=exc.status,
                      error=error_body(exc.type, exc.message)["error"]).to_frame().to_bytes()
