"""Asynchronous dispatch: calls that return at once, in order, with errors at sync points.

This is how a remote call behaves when the client dispatches asynchronously
(the default; ``connect(..., dispatch="sync")`` keeps every call a blocking
round trip), as JAX dispatches locally and IFRT proxy does remotely:

- **The first call of a signature is synchronous.** A signature is the
  transform's digest, ``pull``, and the structure, shapes and dtypes of the
  arguments (Python scalars by value). That call runs as a round trip on the
  stream, so tracing, shape and axis errors raise at the call site, and it tells
  the client what the outputs are (shapes, dtypes) and which states it writes.
- **Later calls return at once** with :class:`~statehost.client.RemoteArray`
  outputs. States they write get a deferred value (``statehost.DeferredValue``)
  that is fetched when first read (``pull=True``), or nothing (``pull=False``).
  A call that uploads local state values runs synchronously: its upload is
  checked against the server's version, and ``retries=`` can re-run it.
- **Order.** Calls run on the server in issue order, one client's at a time
  (``server/stream.py``); at most ``max_in_flight`` wait for their replies.
- **Errors.** A failed call's error is stored on its outputs and raised at the
  next point that synchronises: reading one of its outputs or a state it would
  have written, ``client.sync()``, ``pull``, ``push``, ``put``, ``get``, ``close``.
  The server does not run the calls queued behind it (their outputs raise
  :class:`CallNotRunError`); once the failure was raised, the client sends
  ``resume`` and the stream runs calls again.
- **Ctrl-C** while waiting cancels the calls of this client that have not
  started, then re-raises ``KeyboardInterrupt``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from statehost._state import DeferredValue, State
from statehost.client._arrays import RemoteArray
from statehost.client._errors import (
    ClientClosedError,
    ClientError,
    FunctionNotCachedError,
    SessionNotFoundError,
    StateNotFoundError,
)
from statehost.client._http import client_error
from statehost.client._outputs import as_array, local_outputs, state_array
from statehost.wire import (
    CallReply,
    ControlRequest,
    ErrorReply,
    FetchReply,
    FetchRequest,
    Frame,
    FreeRequest,
    PullReply,
    PullRequest,
    handle_name,
    outputs_signature,
)

if TYPE_CHECKING:
    from statehost.client._client import Client
    from statehost.client._stream import Pending, Stream

__all__ = ["AsyncCall", "Dispatcher", "RemoteStateValue", "Signature"]

WHERE = "statehost client (asynchronous call)"
# Frees of dropped RemoteArrays are sent in batches of this many (and at every sync).
_FREE_BATCH = 64
# A signature's outputs up to this many bytes come with the reply once they are read each
# call (Signature.read): reading one then waits for the reply and fetches nothing.
_INLINE_OUTPUTS = 64 << 10
# Reading one state an asynchronous call wrote also pulls the others it wrote, up to this.
_SIBLING_BYTES = 64 << 20


def _nbytes(avals: Any) -> int:
    """The bytes of the arrays that the ``jax.ShapeDtypeStruct``s in ``avals`` describe."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(avals) if isinstance(x, jax.ShapeDtypeStruct))


class Signature:
    """What the first call of a signature told the client about its outputs and writes.

    ``read``: an output of one of its calls was read since its last call was issued. A
    loop that reads each step's output (``print(loss)``) keeps it true at every issue, and
    its calls then ask for their outputs with the reply (``returns="values"``), when they
    are small (``inline``): one round trip a step instead of the call's and a fetch's. A
    loop that reads at the end keeps it false, and its calls copy nothing to the host.
    """

    __slots__ = ("treedef", "skeleton", "expect", "written", "inline", "read")

    def __init__(self, treedef: Any, skeleton: list[Any], written: tuple[str, ...]):
        self.treedef, self.skeleton, self.written = treedef, skeleton, written
        self.expect = outputs_signature(
            (tuple(x.shape), str(x.dtype), bool(x.weak_type))
            if isinstance(x, jax.ShapeDtypeStruct) else type(x).__name__ for x in skeleton)
        self.inline = _nbytes(skeleton) <= _INLINE_OUTPUTS
        self.read = False

    def returns(self) -> str:
        """What the next call of this signature asks its reply for (and forgets the read)."""
        read, self.read = self.read, False
        return "values" if read and self.inline else "none"


class AsyncCall:
    """One call issued on the stream: its id, its outcome, and how to read its outputs.

    ``status``: ``pending``, then ``committed``, ``failed``, ``not run`` (behind a
    failure) or ``cancelled``.
    """

    __slots__ = ("id", "dispatcher", "pending", "status", "error", "transform", "digest",
                 "signature", "values", "__weakref__")

    def __init__(self, call_id: str, dispatcher: Dispatcher, pending: Pending | None,
                 transform: Any = None, digest: str = "", signature: Signature | None = None):
        self.id = call_id
        self.dispatcher = dispatcher
        self.pending = pending
        self.status = "pending" if pending is not None else "committed"
        self.error: ClientError | None = None
        self.transform = transform
        self.digest = digest
        self.signature = signature
        self.values: list[Any] | None = None  # its outputs, when the reply brought them

    @property
    def finished(self) -> bool:
        return self.status != "pending" or (self.pending is not None and self.pending.done)

    def wait(self) -> None:
        self.dispatcher.wait(self)

    def fetch(self, index: int) -> jax.Array:
        return self.dispatcher.fetch(self, index)

    def __repr__(self) -> str:
        return f"AsyncCall({self.id}, {self.status})"


_NOT_FETCHED = object()


class RemoteStateValue(DeferredValue):
    """A state value written by an asynchronous call, fetched (pulled) on first read."""

    __slots__ = ("dispatcher", "state_id", "call", "fetched")

    def __init__(self, dispatcher: Dispatcher, state_id: str, call: AsyncCall | None,
                 aval: Any):
        super().__init__(aval)
        self.dispatcher, self.state_id, self.call = dispatcher, state_id, call
        self.fetched: Any = _NOT_FETCHED  # set when the client fetched it at close

    def resolve(self) -> Any:
        if self.fetched is not _NOT_FETCHED:
            return self.fetched
        return self.dispatcher.resolve_state(self)


class _Mirror(DeferredValue):
    """The local default random stream's value: its client twin's, when read."""

    __slots__ = ("source",)

    def __init__(self, source: State):
        super().__init__(source.aval)
        self.source = source

    def resolve(self) -> Any:
        return self.source.value


_ONCE_OPEN = object()  # Dispatcher._checked: checked, by the stream being opened


def _in_background(open_stream: Callable[[], Stream]) -> concurrent.futures.Future[Stream]:
    """``open_stream()`` on a thread of its own; its stream or its error in the future."""
    future: concurrent.futures.Future[Stream] = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(open_stream())
        except BaseException as exc:  # noqa: BLE001  raised where the stream is adopted
            future.set_exception(exc)

    threading.Thread(target=run, name="statehost-stream-open", daemon=True).start()
    return future


def _close_once_open(opening: concurrent.futures.Future[Stream]) -> None:
    """Closes the stream ``opening`` opens (at once, if it is open already)."""
    opening.add_done_callback(lambda done: done.exception() is None and done.result().close())


class Dispatcher:
    """A client's asynchronous calls on its stream (see the module docstring)."""

    def __init__(self, client: Client, open_stream: Callable[[], Stream]):
        self.client = client
        self._open_stream = open_stream
        self._stream: Stream | None = None
        self.signatures: dict[Any, Signature] = {}
        self._issued: collections.deque[AsyncCall] = collections.deque()
        self._failure: AsyncCall | None = None  # the first failed call not raised yet
        self._frees: list[str] = []
        # The states given deferred values, by id: the client fetches those still unread
        # when it closes (fetch_deferred), since it cannot fetch them after.
        self._deferred: dict[str, tuple[weakref.ref[State], RemoteStateValue]] = {}
        # The outputs still on the server, by handle: fetch_unread brings those alive at
        # close, as fetch_deferred does states, so they read after the client is gone.
        self._unread: weakref.WeakValueDictionary[str, RemoteArray] = \
            weakref.WeakValueDictionary()
        self._closed = False
        self.unfetched = "it was not fetched"  # why, when close() could not fetch them
        # The stream generation the session was last checked at (by a blocking call over
        # HTTP, which reopens a closed session); None: check again before going async.
        self._checked: tuple[Stream, int] | None | object = None
        # The stream being opened off the call path (see checked); adopted at first use.
        self._opening: concurrent.futures.Future[Stream] | None = None

    @property
    def stream(self) -> Stream:
        """The call stream, opened on first use (a client that only makes blocking calls
        and reads their values never opens one)."""
        if self._stream is None and self._opening is not None:
            self._adopt()
        if self._stream is None:
            self._stream = self._open_stream()
            # A client dropped without close(): its socket closes with it.
            weakref.finalize(self.client, self._stream.close)
        return self._stream

    def _adopt(self) -> None:
        """Takes the stream opened off the call path (waiting for it if need be). If that
        open failed, nothing is opened and the session counts as unchecked: the server it
        checked may be gone (restarted), so the next call runs blocking and checks again."""
        opening, self._opening = self._opening, None
        assert opening is not None
        try:
            stream = opening.result()
        except Exception:  # noqa: BLE001  an open that failed then says nothing of now
            if self._checked is _ONCE_OPEN:
                self._checked = None
            return
        self._stream = stream
        if self._checked is _ONCE_OPEN:
            self._checked = (stream, stream.generation)

    def close(self) -> None:
        self._closed = True
        self._deferred.clear()
        self._unread.clear()
        opening, self._opening = self._opening, None
        if opening is not None:
            _close_once_open(opening)
        if self._stream is not None:
            self._stream.close()

    def may_go_async(self) -> bool:
        """False after the connection was reopened or lost, or the server said the
        session is closed: the next call runs blocking (over HTTP), which reopens the
        session if it must (a restarted server) and says so if values were lost."""
        if self._opening is not None:
            self._adopt()
        stream = self._stream
        if stream is not None and stream.broken and not self._issued:
            stream.close()
            self._stream = stream = None
        return stream is not None and not stream.broken \
            and self._checked == (stream, stream.generation)

    def checked(self) -> None:
        """A blocking call just succeeded: the session is open; open the stream (for the
        asynchronous calls to come) and remember it as current. Never raises: the call
        committed, and a stream that cannot open now is tried again at the next call.

        The first stream opens on a thread of its own, and the first asynchronous call
        adopts it (waiting for it if need be): the blocking call that checked the session
        returns without waiting for a WebSocket handshake (5 ms of a second client's
        first call, issue 13)."""
        if self._stream is None:
            if self._opening is None:
                self._opening = _in_background(self._open_stream)
                # A client dropped without close(): the stream closes with it, adopted or not.
                weakref.finalize(self.client, _close_once_open, self._opening)
            self._checked = _ONCE_OPEN
            return
        try:
            stream = self.stream
        except ClientError:
            self._checked = None
            return
        self._checked = (stream, stream.generation)

    # -- signatures ------------------------------------------------------------------
    @staticmethod
    def key(digest: str, pull: bool, leaves: list[Any], treedef: Any) -> Any:
        """The call's signature from its flattened arguments (the caller flattens them
        once, for this and for packing), or None when an argument has no abstract value
        we trust (such a call always runs synchronously)."""
        parts: list[Any] = [digest, pull, treedef]
        for x in leaves:
            if isinstance(x, RemoteArray):
                parts.append((x.shape, x.dtype.str, x.weak_type))
            elif isinstance(x, jax.Array):
                parts.append((x.shape, x.dtype.str, x.weak_type))
            elif isinstance(x, np.ndarray | np.generic):
                parts.append((x.shape, x.dtype.str))
            elif isinstance(x, bool | int | float | complex | str | None):
                parts.append((type(x), x))
            elif isinstance(x, State):
                parts.append(("state", x.id))
            else:
                return None
        return tuple(parts)

    # -- issuing -----------------------------------------------------------------------
    def issue(self, message: Any, transform: Any, digest: str,
              signature: Signature | None = None) -> AsyncCall:
        """Sends an asynchronous call (a ``CallRequest``) and returns its handle at once."""
        self.drain()
        self._flush_frees(force=False)
        pending = self.stream.send(message.call_id, message.to_frame().to_bytes())
        call = AsyncCall(message.call_id, self, pending, transform, digest, signature)
        self._issued.append(call)
        return call

    def outputs(self, call: AsyncCall, signature: Signature, values: list[Any] | None = None
                ) -> Any:
        """The call's outputs: a ``RemoteArray`` per array leaf, freed when dropped.
        ``values``: their ``jax.Array``s when the reply brought them (a blocking call)."""
        leaves = []
        for i, leaf in enumerate(signature.skeleton):
            if isinstance(leaf, jax.ShapeDtypeStruct):
                array = RemoteArray(call, i, leaf.shape, leaf.dtype, bool(leaf.weak_type))
                name = handle_name(call.id, i)
                if values is not None:
                    array._value = values[i]
                else:
                    self._unread[name] = array
                weakref.finalize(array, self._freed, name)
                leaves.append(array)
            else:
                leaves.append(leaf)
        return jax.tree_util.tree_unflatten(signature.treedef, leaves)

    def defer(self, state: State, call: AsyncCall) -> None:
        """``state`` gets the value ``call`` will write, fetched when read."""
        deferred = RemoteStateValue(self, state.id, call, state.aval)
        state.defer(deferred)
        self._deferred[state.id] = (weakref.ref(state), deferred)

    def fetch_deferred(self) -> None:
        """Fetches, in one pull, the deferred values of this client's states not read yet
        (the client is closing: after that nothing could fetch them). Call after ``sync``."""
        unread = {}
        for state_id, (ref, deferred) in self._deferred.items():
            state = ref()
            if state is not None and state.is_deferred and deferred.fetched is _NOT_FETCHED:
                unread[state_id] = (state, deferred)
        self._deferred.clear()
        if not unread:
            return
        for state_id, value in self._pull(tuple(unread)):
            state, deferred = unread[state_id]
            deferred.fetched, deferred.call = value, None
            state.value  # noqa: B018  installs the fetched value in place of the deferred one

    def fetch_unread(self) -> None:
        """Fetches the outputs still alive and not read of this client's committed calls
        (the client is closing: after that nothing could fetch them), in fetches of at
        most ``_SIBLING_BYTES`` each. Call after ``sync``."""
        unread = [(name, array) for name, array in list(self._unread.items())
                  if array._value is None and array._call.status == "committed"
                  and array._call.values is None]  # a reply that brought them: read
        self._unread.clear()
        batch: list[tuple[str, RemoteArray]] = []
        nbytes = 0
        for name, array in unread:
            size = array.size * array.dtype.itemsize
            if batch and nbytes + size > _SIBLING_BYTES:
                self._fetch_into(batch)
                batch, nbytes = [], 0
            batch.append((name, array))
            nbytes += size
        if batch:
            self._fetch_into(batch)

    def _fetch_into(self, arrays: list[tuple[str, RemoteArray]]) -> None:
        reply = FetchReply.from_frame(self.roundtrip(FetchRequest(
            session=self.client._session, call_id=self.client.next_call_id(),
            handles=tuple(name for name, _ in arrays))))
        weak = reply.weak_types or (False,) * len(arrays)
        for (_, array), value, weak_type in zip(arrays, reply.values.load(), weak,
                                                strict=True):
            array._value = as_array(value, weak_type)

    def _pull(self, ids: tuple[str, ...]) -> list[tuple[str, jax.Array]]:
        """The server's current values of these states, in one pull; the ledger learns that
        the local states hold them."""
        reply = PullReply.from_frame(self.roundtrip(PullRequest(
            session=self.client._session, call_id=self.client.next_call_id(), ids=ids)))
        pulled = []
        for state_id, value in reply.states.load():
            state = self.client._ledger.tracked(state_id)
            if state is not None:
                self.client._ledger.received(state, reply.state_versions.get(state_id))
            pulled.append((state_id, state_array(value)))
        return pulled

    @staticmethod
    def mirror(local: State, twin: State) -> None:
        local.defer(_Mirror(twin))

    # -- replies -----------------------------------------------------------------------
    def drain(self) -> None:
        """Settles, in issue order, the calls whose replies came (ledger updates, errors)."""
        while self._issued and self._issued[0].pending.done:
            self._settle(self._issued.popleft())

    def _settle(self, call: AsyncCall) -> None:
        pending = call.pending
        assert pending is not None
        ledger = self.client._ledger
        if pending.error is not None:
            call.status, call.error = "failed", pending.error  # type: ignore[assignment]
        elif pending.frame is not None and pending.frame.header.get("kind") == CallReply.kind:
            reply = CallReply.from_frame(pending.frame)
            call.status = "committed"
            if reply.results is not None:  # asked for (Signature.read): no fetch needed
                call.values = jax.tree_util.tree_leaves(local_outputs(reply))
            ledger.function_sent(call.digest)
            ledger.rebase(reply.state_versions)
        else:
            error = self._error(pending.frame, f"call {call.id}")
            kind = error.body.get("type")
            call.status = {"CallNotRunError": "not run",
                           "CallCancelledError": "cancelled"}.get(kind, "failed")
            if isinstance(error, FunctionNotCachedError):
                ledger.function_dropped(call.digest)
            if isinstance(error, SessionNotFoundError):
                self._checked = None
            if isinstance(error, StateNotFoundError):
                ledger.forget(error.missing)
            call.error = self.client._localized_error(error, call.transform)
        call.pending = None
        if call.status == "failed" and self._failure is None:
            self._failure = call

    @staticmethod
    def _error(frame: Frame | None, what: str) -> ClientError:
        reply = ErrorReply.from_frame(frame)
        return client_error(reply.status, reply.error, str(reply.error.get("message", "")),
                            what)

    # -- synchronising -------------------------------------------------------------------
    def wait(self, call: AsyncCall) -> None:
        """Waits for ``call``; raises its failure (or the failure before it) if any."""
        if call.pending is not None:
            self._wait(call.pending)
            self.drain()
        if call.status == "committed":
            return
        if self._failure is not None and call is not self._failure:
            raise self._take_failure()
        if call is self._failure:
            self._take_failure()
        assert call.error is not None
        raise call.error

    def _wait(self, pending: Pending) -> None:
        if not pending.done and self._stream is not None:
            self._stream.flush()  # the user waits: what is held back leaves now
        try:
            pending.wait()
        except KeyboardInterrupt:
            self.cancel_pending()
            raise

    def sync(self) -> None:
        """Waits for every call in flight; raises the first failure not raised yet."""
        if self._stream is None:
            return
        if self._issued:
            last = self._issued[-1].pending
            if last is not None:
                self._wait(last)
            self.drain()
        if self._failure is not None:
            raise self._take_failure()
        self._flush_frees(force=True)

    def _take_failure(self) -> ClientError:
        failed, self._failure = self._failure, None
        assert failed is not None and failed.error is not None
        self.stream.post(ControlRequest(session=self.client._session, op="resume")
                         .to_frame().to_bytes())
        return failed.error

    def cancel_pending(self) -> None:
        """Cancels this client's calls that have not started (Ctrl-C)."""
        ids = tuple(c.id for c in self._issued if c.status == "pending")
        if ids:
            try:
                self.stream.post(ControlRequest(session=self.client._session, op="cancel",
                                                ids=ids).to_frame().to_bytes())
            except ClientError:
                pass  # the stream is gone: nothing more will run anyway

    @property
    def in_flight(self) -> int:
        return sum(c.status == "pending" for c in self._issued)

    # -- reading values ------------------------------------------------------------------
    def roundtrip(self, message: Any) -> Frame:
        """Sends a request with a reply on the stream and waits for it; raises its error."""
        pending = self.stream.send(message.call_id, message.to_frame().to_bytes())
        self._wait(pending)
        if pending.error is not None:
            raise pending.error
        assert pending.frame is not None
        if pending.frame.header.get("kind") == ErrorReply.kind:
            error = self._error(pending.frame, f"{message.kind} {message.call_id}")
            if message.kind == "call":  # the server stopped the line behind it: go on
                self.stream.post(ControlRequest(session=self.client._session, op="resume")
                                 .to_frame().to_bytes())
            raise error
        return pending.frame

    def fetch(self, call: AsyncCall, index: int) -> jax.Array:
        self.wait(call)
        if call.signature is not None:
            call.signature.read = True
        if call.values is not None:
            return call.values[index]
        if self._closed:
            raise ClientClosedError(
                f"reading output {index} of call {call.id}: it stayed on the server, and "
                f"fetching it when the client closed failed ({self.unfetched}). Fix: read "
                "outputs before client.close(), or return what you need from a call made "
                "before it.")
        reply = FetchReply.from_frame(self.roundtrip(FetchRequest(
            session=self.client._session, call_id=self.client.next_call_id(),
            handles=(handle_name(call.id, index),))))
        (value,) = reply.values.load()
        return as_array(value, reply.weak_types[0] if reply.weak_types else False)

    def resolve_state(self, deferred: RemoteStateValue) -> Any:
        if self._closed:
            raise ClientClosedError(
                f"reading state {deferred.state_id[:8]}...: its value was written on the "
                "server by a call of a client that is closed now, and fetching it when the "
                f"client closed failed ({self.unfetched}). Fix: read state "
                "values before client.close(), or pull them with a new client "
                "(client.pull(state)) while the server keeps them (named states).")
        call, deferred.call = deferred.call, None
        if call is not None and call.pending is not None:
            try:
                self._wait(call.pending)
            except KeyboardInterrupt:
                deferred.call = call
                raise
            self.drain()
        if self._failure is not None:
            # The failure is raised once, here; read again, the state has the server's
            # value, which the failed call (and the calls not run behind it) left as it was.
            raise self._take_failure()
        siblings = self._written_with(deferred, call) if call is not None else {}
        value = None
        for state_id, pulled in self._pull((deferred.state_id, *siblings)):
            if state_id == deferred.state_id:
                value = pulled
            else:
                siblings[state_id].fetched, siblings[state_id].call = pulled, None
        return value

    def _written_with(self, deferred: RemoteStateValue, call: AsyncCall
                      ) -> dict[str, RemoteStateValue]:
        """The other unread values ``call`` wrote (a model's states, read one after the
        other), up to ``_SIBLING_BYTES`` of them: they come in the same pull as
        ``deferred``'s, and their states install them when read."""
        found, nbytes = {}, 0
        for state_id, (ref, other) in self._deferred.items():
            if other.call is not call or other is deferred or ref() is None \
                    or other.fetched is not _NOT_FETCHED:
                continue
            nbytes += _nbytes(other.aval)
            if nbytes > _SIBLING_BYTES:
                break
            found[state_id] = other
        return found

    # -- freeing -------------------------------------------------------------------------
    def _freed(self, name: str) -> None:
        """A RemoteArray was garbage-collected (any thread): free its buffer later."""
        self._frees.append(name)

    def _flush_frees(self, *, force: bool) -> None:
        if not self._frees or (not force and len(self._frees) < _FREE_BATCH):
            return
        if self._stream is None and len(self._frees) < _FREE_BATCH:
            return  # a few arrays of blocking calls: not worth a stream (the session frees)
        batch, self._frees = self._frees, []
        self.stream.post(FreeRequest(session=self.client._session, handles=tuple(batch))
                         .to_frame().to_bytes())
