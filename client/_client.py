"""``Client`` and ``connect``: run statehost transforms on a remote ``statehost serve``.

The client's :class:`~statehost.client._ledger.SyncLedger` knows, per state,
whether the server has the local value: a call uploads only states the server
lacks or that were set locally since; a call with ``pull=False`` marks the
states it wrote as newer on the server, and ``pull`` brings them back. Every
request is a typed message of ``statehost.wire``.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from statehost._display import add_tracker, html_table
from statehost._state import State
from statehost.client._dispatch import AsyncCall, Dispatcher, Signature
from statehost.client._errors import (
    ClientError,
    FunctionNotCachedError,
    NotFoundError,
    RemoteExecutionError,
    SessionNotFoundError,
    StateConflictError,
    StateNotFoundError,
    TransportError,
    VersionMismatchError,
    remote_execution_error,
)
from statehost.client._http import Http
from statehost.client._ledger import SyncLedger
from statehost.client._outputs import local_outputs, state_array
from statehost.client._remote import RemoteDevice, RemotePlacement, localize_traceback
from statehost.client._token import TokenSource, is_local_url
from statehost.nn import Module
from statehost.random import RandomState, default_stream
from statehost.transform import StatefulMapping as _LocalStatefulMapping
from statehost.transform import jit as _local_jit
from statehost.transform import pmap as _local_pmap
from statehost.transform import vmap as _local_vmap
from statehost.transform._jit import MISSING
from statehost.transform._placement import place
from statehost.transform._stateful import StatefulCall
from statehost.wire import (
    CallReply,
    CallRequest,
    Frame,
    GetReply,
    GetRequest,
    Message,
    PullReply,
    PullRequest,
    PushReply,
    PushRequest,
    PutReply,
    PutRequest,
    RegisterReply,
    RegisterRequest,
    StateRecord,
    StateRef,
    local_versions,
    pack,
    version_problems,
)

__all__ = ["Client", "connect"]

_MSG_LOST_STATES = (
    "{what}: the server closed this client's session (idle past its TTL, or restarted), "
    "and with it the newest values of {count} state(s) that were left on the server by "
    "pull=False calls ({names}). Those values are gone. Fix: keep sessions alive with regular "
    "calls, or use pull=True (or client.pull) before long pauses."
)
_MSG_GONE_STATES = (
    "{what}: {count} state(s) it uses ({names}) are no longer on the server (their named "
    "object was deleted, here or by another client), and their newest values were there "
    "only, left by pull=False calls or never pulled: those values are gone. The local states "
    "keep the values they last had here; re-running the call uploads those."
)
_DISPATCH_MODES = ("async", "sync")
# A request is re-sent at most this many times for the client's own bookkeeping: a
# callable the server dropped from its cache, a session it closed.
_RESENDS = 2
# Arguments larger than this go by HTTP (``POST /v1/call``, as a blocking call), not the
# call stream: a WebSocket message is copied whole several times on each side (framing,
# masking), where an HTTP frame streams in 1 MiB memoryview chunks (or shared memory on
# the Unix socket). 128 MiB took 3x the HTTP time over the stream on the 2-core machine.
_STREAM_ARGS_MAX = 1 << 20


def _to_host(tree: Any) -> Any:
    """``jax.Array`` leaves as numpy arrays, so their data travels out of band."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree
    )


def _host_leaves(leaves: list[Any], treedef: Any) -> Any:
    """``_to_host`` of an already flattened tree: the tree again, with host leaves."""
    return jax.tree_util.tree_unflatten(
        treedef, [np.asarray(x) if isinstance(x, jax.Array) else x for x in leaves])


def _collect(obj: Any, api: str) -> list[State]:
    if isinstance(obj, State):
        return [obj]
    if isinstance(obj, Module):
        return list(obj.states().values())
    if isinstance(obj, StatefulCall) and isinstance(obj.placement, RemotePlacement):
        return list(obj.placement.packed(obj).states)
    if isinstance(obj, Mapping):
        return [s for v in obj.values() for s in _collect(v, api)]
    if isinstance(obj, list | tuple):
        return [s for v in obj for s in _collect(v, api)]
    raise TypeError(
        f"{api}: expected a State, a Module, or a list/tuple/dict of them; got "
        f"{type(obj).__name__}. Example: client.{api.split('.')[-1]}(model)."
    )


class Client:
    """A connection to one ``statehost serve``; use one per server and reuse it.

    Arguments:
        base_url: the server's URL, e.g. ``"http://127.0.0.1:8470"``.
        timeout: seconds to wait for any answer (a long call needs a long timeout).
        auth: the bearer token, or a ``TokenSource`` (``statehost.connect`` finds one for
            you, and re-reads the local token file when the server refuses it).
        transport: an ``httpx`` transport to use instead of the network (tests); when it
            is also a ``FrameTransport`` (``statehost.server.testing.InProcessTransport``
            is), frames go through it too, and its ``open_stream`` carries the call stream.
        dispatch: ``"async"`` (default): a call whose signature ran before returns at once
            with ``RemoteArray`` outputs, as JAX dispatches (``client/_dispatch.py``);
            ``"sync"``: every call is a blocking round trip returning ``jax.Array``s.
        max_in_flight: asynchronous calls waiting for the server at most; the next one
            blocks until one completes.

    Example:
        >>> client = statehost.connect("http://127.0.0.1:8470")    # doctest: +SKIP
        >>> step = client.pmap(model, axis_name="i", in_axes=0)   # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        base_url: str,
        timeout: float = 60.0,
        auth: str | TokenSource | None = None,
        transport: Any = None,
        dispatch: str = "async",
        max_in_flight: int = 64,
        progress: bool = True,
    ):
        if dispatch not in _DISPATCH_MODES:
            raise ValueError(f"statehost.connect: dispatch={dispatch!r} is not one of "
                             f"{_DISPATCH_MODES}. Example: statehost.connect(url, "
                             "dispatch='sync').")
        if not isinstance(max_in_flight, int) or isinstance(max_in_flight, bool) \
                or max_in_flight < 1:
            raise ValueError(f"statehost.connect: max_in_flight={max_in_flight!r} must be an "
                             "int >= 1 (default 64).")
        self.url = base_url.rstrip("/")
        self._http = Http(self.url, auth, timeout, transport)
        self._http.progress = bool(progress)
        self._max_in_flight = max_in_flight
        self._max_body = 4 * 2**30
        # Call ids: unique in a session, cheap (os.urandom per call cost a GIL hand-off).
        self._id_prefix = secrets.token_hex(4)
        self._ids = itertools.count()
        # Async needs the call stream: over the network, or a transport that serves one.
        self.dispatch = dispatch if self._http.can_stream() else "sync"
        self._dispatcher: Dispatcher | None = None
        self._ledger = SyncLedger(self.url)
        add_tracker(self._ledger)  # module displays show what this connection knows
        # This client's own stand-in for each local default random stream: the process's
        # stream has one id, and two clients of one process must not share a server state.
        self._streams: weakref.WeakKeyDictionary[RandomState, _StreamTwin] = \
            weakref.WeakKeyDictionary()
        self._session: str | None = None
        try:
            self.server_info = self._http.json("GET", "/v1/info")
            self._check_versions(self.server_info.get("versions", {}))
            self._use_unix_socket()
            self._http.use_shared_memory(self.server_info)
            self._max_body = int(self.server_info.get("limits", {}).get("max_body",
                                                                        self._max_body))
            self._open_session()
        except BaseException:
            self._http.close()
            raise
        if self.dispatch == "async":
            _warm_stream_imports()

    # -- lifecycle --------------------------------------------------------------
    def _use_unix_socket(self) -> None:
        """Given a loopback URL, moves to the Unix socket the server advertises, when this
        process can open it and the very same server answers there (a loopback URL can be
        a tunnel to another host, whose socket path may exist here for another server)."""
        path = self.server_info.get("unix_socket")
        if (not path or self._http.unix is not None or self._http._transport is not None
                or not is_local_url(self.url) or not os.access(path, os.R_OK | os.W_OK)):
            return
        instance = self.server_info.get("instance")
        try:
            self._http.use_unix(path)
            if self._http.json("GET", "/v1/info").get("instance") == instance:
                return
        except ClientError:
            pass
        self._http.use_unix(None)  # not the same server, or it would not answer: TCP

    @property
    def via(self) -> str:
        """How this client reaches its server: ``"tcp"``, or ``"unix:///path"``."""
        return "tcp" if self._http.unix is None else f"unix://{self._http.unix}"

    def _check_versions(self, server: dict[str, Any]) -> None:
        problems = version_problems(local_versions(), server, me="client", them="server")
        if problems:
            raise VersionMismatchError(
                f"statehost.connect({self.url!r}): client and server cannot exchange pickles: "
                + "; ".join(problems)
                + ". Fix: install the server's versions in the client environment "
                "(or the other way round)."
            )

    def _open_session(self) -> None:
        # Who we are, so the server tells this client's commits from other kernels' with
        # the same token (info's "writer").
        me = {"client": {"host": socket.gethostname(), "pid": os.getpid()}}
        self._session = self._http.json("POST", "/v1/sessions", json=me)["id"]
        self._ledger.forget_server()

    def close(self) -> None:
        """Waits for the calls in flight, fetches the state values they wrote and the outputs
        still held that were not read yet (in one pull and one fetch, so ``state.value``
        and ``np.asarray(out)`` work after the client is gone), then
        closes the session (the server frees its states) and the connection. Raises an
        asynchronous call's failure not raised yet (after closing)."""
        if self._http.closed:
            return
        failure = None
        if self._dispatcher is not None:
            try:
                self._dispatcher.sync()
            except ClientError as exc:
                failure = exc
            try:  # the values calls wrote or returned and nobody read yet: the last chance
                self._dispatcher.fetch_deferred()  # to fetch them
                self._dispatcher.fetch_unread()
            except ClientError as exc:  # the server went away: reading them says so
                self._dispatcher.unfetched = str(exc)
            finally:
                self._dispatcher.close()
                self._dispatcher = None
        try:
            if self._session is not None:
                self._http.json("DELETE", f"/v1/sessions/{self._session}")
        except Exception:  # closing must not fail because the server went away
            pass
        finally:
            self._http.close()
        if failure is not None:
            raise failure

    def __enter__(self) -> Client:
        self._http.client  # raises if closed  # noqa: B018
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        try:
            self.close()
        except ClientError:
            if kind is None:  # an exception already on its way out stays the one raised
                raise

    def sync(self) -> None:
        """Waits for every asynchronous call of this client; raises the first failure
        among them not raised yet (with its remote traceback). A no-op for
        ``dispatch="sync"``.

        Example:
            >>> for batch in data:                 # doctest: +SKIP
            ...     loss = step(batch)             # returns at once
            >>> client.sync()                      # doctest: +SKIP
        """
        if self._dispatcher is not None:
            self._dispatcher.sync()

    def next_call_id(self) -> str:
        """A fresh id for a request of this client (16 hex digits)."""
        return f"{self._id_prefix}{next(self._ids):08x}"

    def _synced(self) -> None:
        """A synchronising point: what was issued before has run (or raised)."""
        if self._dispatcher is not None:
            self._dispatcher.sync()

    def _stream(self) -> Dispatcher:
        if self._dispatcher is None:
            from statehost.client._stream import Stream

            http = self._http
            http.client  # raises ClientClosedError after close()  # noqa: B018
            where, max_in_flight = f"statehost client {self.url}", self._max_in_flight
            # The stream refers to the transport, never to this client: the finalizer that
            # closes it when the client is dropped holds it, and would keep the client alive.
            self._dispatcher = Dispatcher(self, lambda: Stream(
                lambda: http.open_stream("/v1/stream"), max_in_flight, where))
        return self._dispatcher

    def __repr__(self) -> str:
        state = "closed" if self._http.closed else f"session {self._session[:8]}"
        via = "" if self._http.unix is None or self.url.startswith("unix://") \
            else f", via unix://{self._http.unix}"
        return f"statehost.Client({self.url!r}, {state}{via})"

    def _repr_html_(self) -> str:
        """The notebook display, from what the client holds (no request): the server, the
        versions on both sides, the devices as of connect, the session, the dashboard."""
        versions = self.server_info.get("versions", {})
        mine = local_versions()
        rows = [("server", self.url), ("via", self.via),
                ("session", "closed" if self._http.closed else self._session[:8]),
                ("dispatch", self.dispatch), ("dashboard", f"{self.url}/dashboard")]
        rows += [(f"{name} (server / client)", f"{versions.get(name, '?')} / {mine.get(name)}")
                 for name in ("statehost", "jax", "python", "cloudpickle")]
        in_use = self.server_info.get("memory_in_use", {})
        devices = [(d["id"], d["platform"], d["kind"], _gib(in_use.get(str(d["id"]))),
                    _gib(d.get("memory"))) for d in self.server_info.get("devices", [])]
        return (html_table(None, rows, caption="statehost.Client")
                + html_table(("device", "platform", "kind", "memory in use", "memory limit"),
                             devices, caption=f"{len(devices)} device(s), as of connect"))

    # -- devices and transforms -----------------------------------------------
    def devices(self) -> list[RemoteDevice]:
        """The server's devices, usable as ``devices=`` of ``client.pmap``."""
        return [RemoteDevice(**d) for d in self.server_info["devices"]]

    def _wrap(self, factory: Callable[..., Any], fun: Any, extra: dict, args, kwargs) -> Any:
        if fun is MISSING:
            return lambda f: self._wrap(factory, f, extra, args, kwargs)
        placement = RemotePlacement(self, **extra)  # checks pull= and retries= first
        return place(factory(fun, *args, **kwargs), placement)

    def pmap(self, fun: Any = MISSING, *args: Any, pull: bool = True, retries: int = 0,
             sync: bool = False, timeout: float | None = None, **kwargs: Any) -> Any:
        """``statehost.transform.pmap`` run on the server: same arguments, plus two.

        Arguments:
            pull: True (default) writes the updated state values into the local
                ``State`` objects after each call; False leaves them on the server
                until ``client.pull``.
            retries: on a :class:`StateConflictError` (a local value based on an
                outdated version), pull the conflicting states and run again, up to
                this many times. The local changes to those states are dropped.
            sync: run every call as a blocking round trip returning ``jax.Array``s, even
                when the client dispatches asynchronously (``connect(dispatch=...)``).
            timeout: seconds a call may wait on the server before it starts; past it, it
                is dropped with ``CallTimeoutError`` and nothing is applied (default: the
                server's ``--call-timeout``). A running call is never interrupted.

        Returns:
            The ``statehost.transform.StatefulMapping`` that ``pmap`` builds, placed on
            this client's server (its ``placement`` is a :class:`RemotePlacement`); a
            decorator when ``fun`` is omitted.
        """
        return self._wrap(_local_pmap, fun, _options(pull, retries, sync, timeout),
                          args, kwargs)

    def vmap(self, fun: Any = MISSING, *, pull: bool = True, retries: int = 0,
             sync: bool = False, timeout: float | None = None, **kwargs: Any) -> Any:
        """``statehost.transform.vmap`` run on the server: same arguments, plus ``pull``,
        ``retries``, ``sync``, ``timeout`` (see :meth:`pmap`)."""
        return self._wrap(_local_vmap, fun, _options(pull, retries, sync, timeout),
                          (), kwargs)

    def jit(self, fun: Any = MISSING, *, pull: bool = True, retries: int = 0,
            sync: bool = False, timeout: float | None = None, **kwargs: Any) -> Any:
        """``statehost.transform.jit`` run on the server: same arguments, plus ``pull``,
        ``retries``, ``sync``, ``timeout`` (see :meth:`pmap`)."""
        return self._wrap(_local_jit, fun, _options(pull, retries, sync, timeout),
                          (), kwargs)

    def StatefulMapping(self, fun: Any, *args: Any, pull: bool = True, retries: int = 0,  # noqa: N802
                        sync: bool = False, timeout: float | None = None,
                        **kwargs: Any) -> Any:
        """``statehost.transform.StatefulMapping`` run on the server, plus ``pull``,
        ``retries``, ``sync``, ``timeout`` (see :meth:`pmap`)."""
        return self._wrap(_LocalStatefulMapping, fun, _options(pull, retries, sync, timeout),
                          args, kwargs)

    # -- state sync -----------------------------------------------------------
    def _records(self, states: Iterable[State]) -> Any:
        return pack([StateRecord.of(s, _to_host(s.value)) for s in states], refs=False)

    def _apply(self, values: Any, versions: Mapping[str, int], known: Mapping[str, State]
               ) -> set[str]:
        """Writes the values that came back into the local states; returns their ids."""
        pulled = set()
        for state_id, value in values or []:
            state = known.get(state_id) or self._ledger.tracked(state_id)
            if state is None:
                continue
            state.value = state_array(value)
            self._ledger.received(state, versions.get(state_id))
            pulled.add(state_id)
        return pulled

    def push(self, module_or_states: Any) -> None:
        """Uploads the values of these states, replacing the server's.

        Arguments:
            module_or_states: a ``Module``, a ``State``, or a list/dict of them.
        """
        states = {s.id: s for s in _collect(module_or_states, "statehost.Client.push")}
        self._synced()
        counts = {i: s.write_count for i, s in states.items()}
        reply = PushReply.from_frame(self._send("/v1/states/push", lambda: PushRequest(
            session=self._session, uploads=self._ledger.bases(states.values()),
            states=self._records(states.values()))))
        self._ledger.track(states.values())
        self._ledger.sent(counts, reply.state_versions)

    def pull(self, module_or_states: Any) -> None:
        """Writes the server's current values into these local states.

        Arguments:
            module_or_states: a ``Module``, a ``State``, or a list/dict of them.
        """
        states = {s.id: s for s in _collect(module_or_states, "statehost.Client.pull")}
        self._synced()
        try:
            reply = PullReply.from_frame(self._http.frame("/v1/states/pull", PullRequest(
                session=self._session, ids=tuple(states))))
        except StateNotFoundError as exc:
            self._ledger.forget(exc.missing)  # the next call uploads them, as the error says
            raise
        self._apply(reply.states.load(), reply.state_versions, states)

    # -- named objects ----------------------------------------------------------
    def put(self, name: str, obj: Any) -> None:
        """Registers ``obj`` (a Module, a State, or a dict of States) as ``"namespace/name"``.

        The server keeps one copy of its states under that name, with versions,
        across sessions and restarts; values it lacks are uploaded.

        Example:
            >>> client.put("team/net", model)              # doctest: +SKIP
            >>> net = other_client.get("team/net")         # doctest: +SKIP
        """
        if isinstance(obj, Module):
            paths = {s.id: ".".join(map(str, p)) for p, s in obj.states().items()}
            kind = "module"
        elif isinstance(obj, State):
            paths, kind = {obj.id: ""}, "state"
        elif isinstance(obj, Mapping) and all(isinstance(v, State) for v in obj.values()):
            paths, kind = {v.id: str(k) for k, v in obj.items()}, "dict"
        else:
            raise TypeError(
                f"statehost.Client.put({name!r}, ...): expected a Module, a State or a dict of "
                f"States, got {type(obj).__name__}. Example: client.put('team/net', model)."
            )
        states = {s.id: s for s in _collect(obj, "statehost.Client.put")}
        self._synced()
        structure = pack(obj, oob=False)

        def message() -> PutRequest:
            uploads = [s for s in states.values() if self._ledger.needs_upload(s)]
            message.counts = {s.id: s.write_count for s in uploads}
            return PutRequest(session=self._session, name=name, object_kind=kind, paths=paths,
                              uploads=self._ledger.bases(uploads), structure=structure,
                              states=self._records(uploads) if uploads else None)

        reply = PutReply.from_frame(self._send("/v1/objects/put", message, refs=states))
        self._ledger.track(states.values())
        self._ledger.sent(message.counts, reply.state_versions)

    def get(self, name: str, *, pull: bool = True) -> Any:
        """The object put as ``"namespace/name"``, its states being the server's.

        Arguments:
            pull: fetch the values now (default); with False the local states hold
                ``None`` until ``client.pull`` (calls work without it).
        """
        self._synced()
        reply = GetReply.from_frame(self._http.frame("/v1/objects/get", GetRequest(
            session=self._session, name=name, pull=pull)))
        values = dict(reply.states.load()) if reply.states is not None else {}
        made: dict[str, State] = {}

        def load(ref: StateRef) -> State:
            if ref.id not in made:
                state = self._ledger.tracked(ref.id)
                value = state_array(values[ref.id]) if ref.id in values else None
                if state is None:
                    state = ref.cls.restore(value, id=ref.id, name=ref.name, tag=ref.tag)
                elif ref.id in values:
                    state.value = value
                made[ref.id] = state
            return made[ref.id]

        obj = reply.structure.load(load)
        self._ledger.track(made.values())
        for state_id, state in made.items():
            if state_id in values:
                self._ledger.received(state, reply.state_versions[state_id])
            else:
                self._ledger.unpulled(state)
        return obj

    def list(self, namespace: str) -> list[dict[str, Any]]:
        """The objects of a namespace, each with its states' metadata."""
        self._synced()
        return self._http.json("GET", f"/v1/namespaces/{namespace}/objects")["objects"]

    def info(self, name: str) -> dict[str, Any]:
        """Metadata of ``"namespace/name"``: states with shapes, dtypes, bytes, version,
        last writer, updated-at and status."""
        namespace, _, obj = name.partition("/")
        self._synced()
        return self._http.json("GET", f"/v1/namespaces/{namespace}/objects/{obj}")

    def delete(self, name: str) -> None:
        """Deletes ``"namespace/name"`` and its states on the server.

        The local states keep their values, and this client forgets the server's copy of
        them: a later ``put`` or call uploads them again.
        """
        namespace, _, obj = name.partition("/")
        self._synced()
        reply = self._http.json("DELETE", f"/v1/namespaces/{namespace}/objects/{obj}")
        self._ledger.forget(reply["deleted"])

    def checkpoint(self, name: str) -> int:
        """Writes ``"namespace/name"`` (or a whole ``"namespace"``) to disk now."""
        namespace, _, obj = name.partition("/")
        self._synced()
        params = {"name": obj} if obj else {}
        return self._http.json("POST", f"/v1/namespaces/{namespace}/checkpoint",
                               params=params)["flushed"]

    def register(self, name: str, mapping: StatefulCall) -> dict[str, Any]:
        """Stores ``mapping`` (from ``client.pmap/vmap/jit``) on the server as
        ``"namespace/name"``, to be run with JSON by anyone with scope ``invoke``
        (``POST /v1/namespaces/{ns}/functions/{name}/invoke``). Every state it uses must
        be a named state of that namespace (``client.put`` them first).

        Returns:
            The function's input signature as the server recorded it.
        """
        if not isinstance(mapping, StatefulCall):
            raise TypeError(
                f"statehost.Client.register({name!r}, ...): expected a transform "
                f"(client.pmap / client.vmap / client.jit), got {type(mapping).__name__}. "
                f"Example: client.register({name!r}, client.jit(fun))."
            )
        placement = mapping.placement
        if not isinstance(placement, RemotePlacement):
            placement = RemotePlacement(self)
        packed = placement.packed(mapping)
        self._synced()
        reply = RegisterReply.from_frame(self._send("/v1/functions/register",
                                                    lambda: RegisterRequest(
            session=self._session, name=name, digest=packed.digest,
            refs=tuple(s.id for s in packed.states), function=packed.section)))
        return reply.signature

    # -- sending --------------------------------------------------------------
    def _send(self, path: str, message: Callable[[], Any], *, refs: Mapping[str, State] = {},
              digest: str | None = None, retries: int = 0,
              post: Callable[[Message], Frame] | None = None) -> Frame:
        """Sends ``message()``; re-sends it, built anew, after the client's own misses.

        ``post`` sends one message and returns the reply (default: HTTP to ``path``; the
        call stream's ``Dispatcher.roundtrip`` for a synchronous call in async mode).

        A callable the server dropped is sent again; a closed session is reopened (unless
        values only the server had are lost with it); on a conflict, up to ``retries``
        times, the conflicting states are pulled and the request re-sent.
        """
        resends = 0
        while True:
            try:
                built = message()
                try:
                    return post(built) if post is not None else self._http.frame(path, built)
                except (KeyboardInterrupt, TransportError) as exc:
                    call_id = getattr(built, "call_id", None) if path == "/v1/call" else None
                    if call_id is None:
                        raise
                    outcome = self._interrupted(call_id)
                    if isinstance(exc, KeyboardInterrupt):
                        exc.add_note(outcome)
                        raise
                    raise TransportError(f"{exc} {outcome}") from exc
            except FunctionNotCachedError:
                if digest is None or resends == _RESENDS:
                    raise
                self._ledger.function_dropped(digest)
            except SessionNotFoundError:
                if resends == _RESENDS:
                    raise
                self._reopen(refs, f"POST {path}")
            except StateNotFoundError as exc:
                if resends == _RESENDS or not self._forget_missing(exc, refs, f"POST {path}"):
                    raise
            except StateConflictError as exc:
                if retries == 0:
                    raise
                retries -= 1
                ids = [c["id"] for c in exc.conflicts]
                self.pull([s for i in ids if (s := self._ledger.tracked(i)) is not None])
                continue
            resends += 1

    def _interrupted(self, call_id: str) -> str:
        """The outcome of a blocking call whose answer did not come (Ctrl-C, a timeout):
        it is cancelled if it has not started, and the text says what became of it."""
        try:
            state = self._http.json("POST", f"/v1/calls/{call_id}/cancel", timeout=5.0)
        except NotFoundError:
            return (f"Call {call_id} had already finished on the server when the client asked: "
                    "it committed, unless it failed; client.pull(...) shows the states.")
        except Exception as exc:  # the server is gone too: say so, do not guess
            return (f"Call {call_id}: its outcome is unknown (the server did not answer "
                    f"either: {type(exc).__name__}).")
        if state.get("status") == "cancelled":
            return f"Call {call_id} was cancelled before it started: nothing was applied."
        return (f"Call {call_id} is still running on the server and cannot be interrupted "
                "(one device program cannot be, openxla/xla#16801): it commits when it ends, "
                "unless it fails; client.pull(...) afterwards shows its effect.")

    def _forget_missing(self, exc: StateNotFoundError, refs: Mapping[str, State],
                        what: str) -> bool:
        """The server lacks states this client thought it had (another client deleted their
        named object): forgets them, so the request, re-sent, uploads the local values.
        False when the missing states are none of the request's. Raises when their newest
        values were on the server only: those are lost, and the caller must know."""
        missing = [i for i in exc.missing if i in refs]
        if not missing:
            return False
        lost = [refs[i] for i in self._ledger.stale_among(missing)]
        self._ledger.forget(missing)
        if lost:
            names = ", ".join(s.name or s.id[:8] for s in lost[:5])
            raise StateNotFoundError(
                _MSG_GONE_STATES.format(what=what, count=len(lost), names=names),
                status=exc.status, body={"missing": [s.id for s in lost]},
            ) from exc
        return True

    def _reopen(self, refs: Mapping[str, State], what: str) -> None:
        lost = [refs[i] for i in self._ledger.stale_among(refs)]
        if lost:
            names = ", ".join(s.name or s.id[:8] for s in lost[:5])
            raise StateNotFoundError(
                _MSG_LOST_STATES.format(what=what, count=len(lost), names=names),
                body={"missing": [s.id for s in lost]},
            )
        self._open_session()

    # -- the call --------------------------------------------------------------
    def _stream_twin(self) -> _StreamTwin:
        local = default_stream()
        twin = self._streams.get(local)
        if twin is None:
            twin = self._streams[local] = _StreamTwin(local)
        twin.follow()
        return twin

    def _call(self, transform: StatefulCall, placement: RemotePlacement, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
        if self.dispatch == "async" and not placement.sync:
            return self._call_async(transform, placement, args, kwargs)
        self._synced()  # a blocking call runs after everything issued before it
        packed = placement.packed(transform)
        call_args = pack(_to_host((args, kwargs)))
        twin = self._stream_twin()
        refs = self._refs(packed.states, call_args.states, twin)
        message = self._call_message(packed, placement, call_args, twin, refs, keep=False)
        reply = self._post_call(transform, placement, packed, message, refs)
        self._committed(reply, packed.digest, message.counts, refs, twin)
        return local_outputs(reply)

    def _post_call(self, transform: Any, placement: RemotePlacement, packed: Any,
                   message: Any, refs: Mapping[str, State]) -> CallReply:
        """``POST /v1/call`` of a built message; a remote error names the user's files."""
        try:
            frame = self._send("/v1/call", message, refs=refs, digest=packed.digest,
                               retries=placement.retries)
        except RemoteExecutionError as exc:
            # The same error with file names filled in; chaining would print it twice.
            raise _localized(exc, transform) from None
        return CallReply.from_frame(frame)

    @staticmethod
    def _refs(transform_states: Iterable[State], arg_states: Iterable[State],
              twin: _StreamTwin) -> dict[str, State]:
        refs = {s.id: s for s in transform_states}
        refs.update((s.id, s) for s in arg_states)
        refs[twin.state.id] = twin.state
        return refs

    def _call_request(self, packed: Any, placement: RemotePlacement, call_args: Any,
                      twin: _StreamTwin, refs: dict[str, State], *, keep: bool,
                      uploads: list[State] | None = None, returns: str = "values",
                      expect: str | None = None) -> CallRequest:
        """The one place a ``CallRequest`` is spelled. A blocking call (no ``expect``)
        uploads ``uploads``, pulls with its mapping's ``pull`` and sends the function section
        when the server may lack it; an asynchronous one (``expect``: the outputs it
        predicts; ``returns``: ``Signature.returns``) uploads nothing, pulls nothing (states
        are read lazily) and is only issued once the server has the function."""
        blocking = expect is None
        pull = placement.pull and blocking
        return CallRequest(
            session=self._session, call_id=self.next_call_id(), digest=packed.digest,
            refs=tuple(refs), uploads=self._ledger.bases(uploads) if uploads else {},
            default_stream=twin.state.id, pull=pull,
            pull_ids=tuple(self._ledger.stale_among(refs)) if pull else (),
            keep_outputs=keep, returns=returns, expect=expect, timeout=placement.timeout,
            function=None if not blocking or self._ledger.has_function(packed.digest)
            else packed.section,
            args=call_args, states=self._records(uploads) if uploads else None)

    def _call_message(self, packed: Any, placement: RemotePlacement, call_args: Any,
                      twin: _StreamTwin, refs: dict[str, State], *, keep: bool
                      ) -> Callable[[], CallRequest]:
        """A blocking call's request, built anew for each (re-)send (what to upload can
        change between sends); ``.counts``: the uploads' write counts at the last build."""

        def message() -> CallRequest:
            uploads = [s for s in refs.values() if self._ledger.needs_upload(s)]
            message.counts = {s.id: s.write_count for s in uploads}
            return self._call_request(packed, placement, call_args, twin, refs, keep=keep,
                                      uploads=uploads)

        return message

    def _committed(self, reply: CallReply, digest: str, counts: dict[str, int],
                   refs: dict[str, State], twin: _StreamTwin) -> None:
        """A synchronous call's reply: what the ledger and the local states learn."""
        self._ledger.function_sent(digest)
        self._ledger.track(refs.values())
        self._ledger.sent(counts, reply.uploaded_versions)
        pulled = self._apply(reply.states.load() if reply.states is not None else None,
                             reply.state_versions, refs)
        self._ledger.written_remotely(set(reply.written) - pulled)
        twin.publish(pulled)

    def _localized_error(self, error: ClientError, transform: Any) -> ClientError:
        if isinstance(error, RemoteExecutionError) and transform is not None:
            return _localized(error, transform)
        return error

    # -- the call, dispatched asynchronously --------------------------------------------
    def _call_async(self, transform: StatefulCall, placement: RemotePlacement,
                    args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """See ``client/_dispatch.py``: returns at once when the signature ran before."""
        dispatcher = self._stream()
        packed = placement.packed(transform)
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))  # once per call
        key = dispatcher.key(packed.digest, placement.pull, leaves, treedef)
        signature = dispatcher.signatures.get(key) if key is not None else None
        call_args = pack(_host_leaves(leaves, treedef))
        twin = self._stream_twin()
        refs = self._refs(packed.states, call_args.states, twin)
        if signature is None or not dispatcher.may_go_async() \
                or not self._ledger.has_function(packed.digest) or any(
                self._ledger.needs_upload(s) for s in refs.values()) \
                or call_args.nbytes > min(_STREAM_ARGS_MAX, self._max_body):
            return self._call_blocking(transform, placement, packed, call_args, twin, refs, key)
        message = self._call_request(packed, placement, call_args, twin, refs, keep=True,
                                     returns=signature.returns(), expect=signature.expect)
        call = dispatcher.issue(message, transform, packed.digest, signature)
        if placement.pull:
            for state_id in signature.written:
                state = refs.get(state_id) or self._ledger.tracked(state_id)
                if state is not None:
                    dispatcher.defer(state, call)
                    self._ledger.received(state, None)
            if twin.state.id in signature.written:
                twin.mirror(dispatcher)
        else:
            self._ledger.written_remotely(signature.written)
        return dispatcher.outputs(call, signature)

    def _call_blocking(self, transform: StatefulCall, placement: RemotePlacement, packed: Any,
                       call_args: Any, twin: _StreamTwin, refs: dict[str, State],
                       key: Any) -> Any:
        """The first call of a signature (or one that uploads): a blocking round trip, so its
        errors raise here; it teaches the client the outputs of the signature. It goes over
        HTTP (``POST /v1/call`` with ``keep_outputs``): nothing is in flight once the stream
        is synced, so the order holds, and it gets HTTP's chunked uploads, its 413 for an
        oversized body, and a graceful shutdown's wait for running requests."""
        dispatcher = self._stream()
        dispatcher.sync()  # a synchronising point: earlier failures raise first
        message = self._call_message(packed, placement, call_args, twin, refs, keep=True)
        reply = self._post_call(transform, placement, packed, message, refs)
        dispatcher.checked()
        self._committed(reply, packed.digest, message.counts, refs, twin)
        values = jax.tree_util.tree_leaves(local_outputs(reply))
        signature = Signature(jax.tree_util.tree_structure(reply.results.load()), [
            jax.ShapeDtypeStruct(v.shape, v.dtype, weak_type=v.weak_type)
            if isinstance(v, jax.Array) else v for v in values], tuple(reply.written))
        if key is not None:
            dispatcher.signatures[key] = signature
        return dispatcher.outputs(AsyncCall(reply.call_id, dispatcher, None, transform,
                                            packed.digest), signature, values)

    # -- jobs and loops
    def loop(self, mapping: Any, steps: int, *args: Any, over: Any = None, keep: str = "last",
             progress: bool = True, timeout: float | None = None, wait: bool = True,
             **kwargs: Any) -> Any:
        """Runs ``mapping`` ``steps`` times on the server, without a round trip per step.

        Each step commits, so a loop that fails, is cancelled (Ctrl-C, ``Job.cancel``) or
        times out leaves the states of its last completed step. With the mapping's
        ``pull=True`` the written states come back into the local ``State`` objects.

        Arguments:
            mapping: a transform from ``client.pmap`` / ``vmap`` / ``jit``.
            steps: how many steps (>= 1).
            args, kwargs: the mapping's arguments, the same at every step.
            over: a pytree of arrays of ``steps`` rows; step ``i`` gets row ``i`` after
                ``args``, as ``jax.lax.scan`` passes ``xs``.
            keep: ``"last"``: the outputs are the last step's; ``"all"``: every step's,
                stacked on a new leading axis.
            progress: a progress bar with steps/s and ETA (``STATEHOST_PROGRESS=0``: none).
            timeout: seconds after which the server stops the loop between steps.
            wait: ``False`` returns the :class:`~statehost.client.Job` at once.

        Returns:
            The outputs (``wait=True``), or the ``Job``.

        Example:
            >>> step = client.pmap(model, axis_name="i")              # doctest: +SKIP
            >>> losses = client.loop(step, 1000, over=batches, keep="all")  # doctest: +SKIP
        """
        from statehost.client import _jobs  # here: this section is all jobs add to the class

        return _jobs.loop(self, mapping, steps, args, kwargs, over=over, keep=keep,
                          progress=progress, timeout=timeout, wait=wait)

    def submit(self, mapping: Any, *args: Any, timeout: float | None = None,
               **kwargs: Any) -> Any:
        """Runs one call of ``mapping`` as a job, and returns its ``statehost.client.Job``
        at once.

        Example:
            >>> job = client.submit(client.jit(train_epoch), data)  # doctest: +SKIP
            >>> job.result()                                         # doctest: +SKIP
        """
        from statehost.client import _jobs

        return _jobs.loop(self, mapping, 1, args, kwargs, over=None, keep="last",
                          progress=False, timeout=timeout, wait=False, api="submit")

    def job(self, id: str) -> Any:  # noqa: A002  the job's id, as Job.id names it
        """The ``statehost.client.Job`` ``id`` of this token (submitted by any process):
        ``JobNotFoundError`` if the server has none."""
        from statehost.client import _jobs

        return _jobs.attach(self, id)


class _StreamTwin:
    """A client's own ``RandomState`` standing in, on the server, for a local stream.

    Its value follows the local stream's (copied before a call when the local
    one moved) and, once a call pulled it back, is written into the local stream.
    """

    def __init__(self, local: RandomState):
        self.local = local
        self.state = RandomState.restore(local.value, id=secrets.token_hex(16),
                                         name="default stream", tag=local.tag)
        self._seen = local.write_count

    def follow(self) -> None:
        if self.local.write_count != self._seen:
            self.state.value = self.local.value
            self._seen = self.local.write_count

    def publish(self, pulled: set[str]) -> None:
        if self.state.id in pulled:
            self.local.value = self.state.value
            self._seen = self.local.write_count

    def mirror(self, dispatcher: Dispatcher) -> None:
        """An asynchronous call writes the twin: the local stream reads its value lazily."""
        dispatcher.mirror(self.local, self.state)
        self._seen = self.local.write_count


def _options(pull: bool, retries: int, sync: bool, timeout: float | None) -> dict[str, Any]:
    """The client-only options of a transform (``RemotePlacement``'s arguments)."""
    return {"pull": pull, "retries": retries, "sync": sync, "timeout": timeout}


def _localized(exc: RemoteExecutionError, transform: StatefulCall) -> RemoteExecutionError:
    """The same error, with the user's file names in its remote traceback."""
    remote = exc.remote_traceback
    if not remote:
        return exc
    fixed = localize_traceback(remote, transform.origin_fun)
    body = {**exc.body, "traceback": fixed}
    return remote_execution_error(str(exc).replace(remote, fixed), status=exc.status, body=body)


def connect(
    url: str = "http://127.0.0.1:8470",
    token: str | None = None,
    timeout: float = 60.0,
    *,
    transport: Any = None,
    dispatch: str = "async",
    max_in_flight: int = 64,
    progress: bool = True,
) -> Client:
    """Connects to a ``statehost serve`` and checks that versions match.

    Arguments:
        url: the server's URL.
        token: the bearer token. When omitted: ``$STATEHOST_TOKEN``, else (for a
            loopback URL) the token the local server wrote to
            ``$XDG_CONFIG_HOME/statehost/token``, read again if the server refuses it
            (a server restarted on a new data dir has a new one).
        timeout: seconds to wait for any answer.
        transport: an ``httpx`` transport to use instead of the network (tests).
        dispatch: ``"async"`` (default: warm calls return at once with ``RemoteArray``
            outputs; see the README's "Asynchronous dispatch") or ``"sync"``.
        max_in_flight: at most this many asynchronous calls wait for the server.
        progress: progress bars on transfers of 64 MiB or more, in a terminal or a
            notebook (``STATEHOST_PROGRESS=0`` turns them off too).

    Returns:
        A :class:`Client`; close it, or use it as a context manager.

    Example:
        >>> with statehost.connect("http://127.0.0.1:8470") as client:  # doctest: +SKIP
        ...     print(client.devices())
    """
    return Client(
        base_url=url, timeout=timeout, auth=TokenSource.find(url, token), transport=transport,
        dispatch=dispatch, max_in_flight=max_in_flight, progress=progress,
    )


def _gib(nbytes: int | None) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def _warm_stream_imports() -> None:
    """Imports the call stream's modules on a daemon thread while the user's code goes on.

    The first call of a signature opens the stream after its answer (``Dispatcher.checked``),
    and importing ``websockets`` there cost 30-130 ms of that call's latency on a 2-core box
    (``bench/bench_sharedbox.py``); by the first call the import is done, or half done (the
    import lock makes the call's own import wait for it, never run it twice).
    """
    def load() -> None:
        try:
            import websockets.sync.client  # noqa: F401

            import statehost.client._stream  # noqa: F401
        except Exception:  # the stream's own open reports what is wrong, where it is used
            pass

    threading.Thread(target=load, name="statehost-warm-imports", daemon=True).start()
