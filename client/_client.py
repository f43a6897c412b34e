"""``Client`` and ``connect``: run statehost transforms on a remote ``statehost serve``.

The client keeps, per state id, the write counter at which the server last
received (or sent) its value. A call uploads only states the server lacks or
that were set locally since; a call with ``pull=False`` marks the states it
wrote as newer on the server, and ``pull`` brings them back.
"""

from __future__ import annotations

import os
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from statehost._config import token_path
from statehost._state import State
from statehost._wire import Frame, encode, local_versions, pack, version_problems
from statehost.client._errors import (
    ProtocolError,
    RemoteExecutionError,
    StateConflictError,
    StateNotFoundError,
    VersionMismatchError,
)
from statehost.client._http import Http
from statehost.client._remote import RemoteDevice, RemoteMapping, localize_traceback
from statehost.nn import Module
from statehost.random import default_stream
from statehost.transform import StatefulMapping as _LocalStatefulMapping
from statehost.transform import jit as _local_jit
from statehost.transform import pmap as _local_pmap
from statehost.transform import vmap as _local_vmap
from statehost.transform._jit import MISSING

__all__ = ["Client", "connect"]

_MSG_LOST_STATES = (
    "{what}: the server closed this client's session (idle past its TTL, or restarted), "
    "and with it the newest values of {count} state(s) that were left on the server by "
    "pull=False calls ({names}). Those values are gone. Fix: keep sessions alive with regular "
    "calls, or use pull=True (or client.pull) before long pauses."
)


def _to_host(tree: Any) -> Any:
    """``jax.Array`` leaves as numpy arrays, so their data travels out of band."""
    return jax.tree_util.tree_map(
        lambda x: np.asarray(x) if isinstance(x, jax.Array) else x, tree
    )


def _collect(obj: Any, api: str) -> list[State]:
    if isinstance(obj, State):
        return [obj]
    if isinstance(obj, Module):
        return list(obj.states().values())
    if isinstance(obj, RemoteMapping):
        return list(obj.packed().states)
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
        auth: the bearer token (``statehost.connect`` finds one for you).
        transport: an ``httpx`` transport to use instead of the network (tests).

    Example:
        >>> client = statehost.connect("http://127.0.0.1:8470")    # doctest: +SKIP
        >>> step = client.pmap(model, axis_name="i", in_axes=0)   # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        base_url: str,
        timeout: float = 60.0,
        auth: str | None = None,
        transport: Any = None,
    ):
        self.url = base_url.rstrip("/")
        self._http = Http(self.url, auth, timeout, transport)
        self._synced: dict[str, int] = {}
        self._base: dict[str, int] = {}  # the server version each local value is based on
        self._stale: set[str] = set()
        self._digests: set[str] = set()
        self._tracked: weakref.WeakValueDictionary[str, State] = weakref.WeakValueDictionary()
        self._session: str | None = None
        try:
            self.server_info = self._http.json("GET", "/v1/info")
            self._check_versions(self.server_info.get("versions", {}))
            self._open_session()
        except BaseException:
            self._http.close()
            raise

    # -- lifecycle --------------------------------------------------------------
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
        self._session = self._http.json("POST", "/v1/sessions")["id"]
        self._synced.clear()
        self._base.clear()
        self._stale.clear()
        self._digests.clear()

    def close(self) -> None:
        """Closes the session (the server frees its states) and the connection."""
        if self._http._client is None:
            return
        try:
            if self._session is not None:
                self._http.json("DELETE", f"/v1/sessions/{self._session}")
        except Exception:  # closing must not fail because the server went away
            pass
        finally:
            self._http.close()

    def __enter__(self) -> Client:
        self._http.client  # raises if closed  # noqa: B018
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._http._client is None else f"session {self._session[:8]}"
        return f"statehost.Client({self.url!r}, {state})"

    # -- devices and transforms -----------------------------------------------
    def devices(self) -> list[RemoteDevice]:
        """The server's devices, usable as ``devices=`` of ``client.pmap``."""
        return [RemoteDevice(**d) for d in self.server_info["devices"]]

    def _wrap(self, factory: Callable[..., Any], fun: Any, extra: dict, args, kwargs) -> Any:
        if fun is MISSING:
            return lambda f: RemoteMapping(self, factory(f, *args, **kwargs), **extra)
        return RemoteMapping(self, factory(fun, *args, **kwargs), **extra)

    def pmap(self, fun: Any = MISSING, *args: Any, pull: bool = True, retries: int = 0,
             **kwargs: Any) -> Any:
        """``statehost.transform.pmap`` run on the server: same arguments, plus two.

        Arguments:
            pull: True (default) writes the updated state values into the local
                ``State`` objects after each call; False leaves them on the server
                until ``client.pull``.
            retries: on a :class:`StateConflictError` (a local value based on an
                outdated version), pull the conflicting states and run again, up to
                this many times. The local changes to those states are dropped.

        Returns:
            A :class:`RemoteMapping` (or a decorator, when ``fun`` is omitted).
        """
        return self._wrap(_local_pmap, fun, {"pull": pull, "retries": retries}, args, kwargs)

    def vmap(self, fun: Any = MISSING, *, pull: bool = True, retries: int = 0,
             **kwargs: Any) -> Any:
        """``statehost.transform.vmap`` run on the server: same arguments, plus ``pull``,
        ``retries`` (see :meth:`pmap`)."""
        return self._wrap(_local_vmap, fun, {"pull": pull, "retries": retries}, (), kwargs)

    def jit(self, fun: Any = MISSING, *, pull: bool = True, retries: int = 0,
            **kwargs: Any) -> Any:
        """``statehost.transform.jit`` run on the server: same arguments, plus ``pull``,
        ``retries`` (see :meth:`pmap`)."""
        return self._wrap(_local_jit, fun, {"pull": pull, "retries": retries}, (), kwargs)

    def StatefulMapping(self, fun: Any, *args: Any, pull: bool = True, retries: int = 0,  # noqa: N802
                        **kwargs: Any) -> Any:
        """``statehost.transform.StatefulMapping`` run on the server, plus ``pull``, ``retries``."""
        return RemoteMapping(self, _LocalStatefulMapping(fun, *args, **kwargs), pull=pull,
                             retries=retries)

    # -- state sync -----------------------------------------------------------
    def _needs_upload(self, state: State) -> bool:
        return self._synced.get(state.id) != state.write_count

    def _records(self, states: Iterable[State]) -> Any:
        return pack(
            [(type(s), s.id, s.name, s.tag, _to_host(s.value)) for s in states], refs=False
        )

    def _mark_synced(self, counts: Mapping[str, int]) -> None:
        for state_id, count in counts.items():
            self._synced[state_id] = count
            self._stale.discard(state_id)

    def _apply(self, frame: Frame, known: Mapping[str, State]) -> set[str]:
        """Writes the values a frame brought back into the local states."""
        pulled = set()
        versions = frame.header.get("state_versions", {})
        for state_id, value in frame.section("states") or []:
            state = known.get(state_id) or self._tracked.get(state_id)
            if state is None:
                continue
            state.value = jax.device_put(value)
            self._synced[state_id] = state.write_count
            if state_id in versions:
                self._base[state_id] = versions[state_id]
            self._stale.discard(state_id)
            pulled.add(state_id)
        return pulled

    def push(self, module_or_states: Any) -> None:
        """Uploads the values of these states, replacing the server's.

        Arguments:
            module_or_states: a ``Module``, a ``State``, or a list/dict of them.
        """
        states = {s.id: s for s in _collect(module_or_states, "statehost.Client.push")}
        counts = {i: s.write_count for i, s in states.items()}
        header = {"session": self._session, "uploads": {i: self._base.get(i) for i in states}}
        frame = self._frame("/v1/states/push", header,
                            {"states": self._records(states.values())})
        self._tracked.update(states)
        self._mark_synced(counts)
        self._base.update(frame.header.get("state_versions", {}))

    def pull(self, module_or_states: Any) -> None:
        """Writes the server's current values into these local states.

        Arguments:
            module_or_states: a ``Module``, a ``State``, or a list/dict of them.
        """
        states = {s.id: s for s in _collect(module_or_states, "statehost.Client.pull")}
        frame = self._frame("/v1/states/pull", {"session": self._session, "ids": list(states)})
        self._apply(frame, states)

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
        uploads = [s for s in states.values() if self._needs_upload(s)]
        counts = {s.id: s.write_count for s in uploads}
        header = {"session": self._session, "name": name, "kind": kind, "paths": paths,
                  "uploads": {s.id: self._base.get(s.id) for s in uploads}}
        sections = {"structure": pack(obj, oob=False)}
        if uploads:
            sections["states"] = self._records(uploads)
        frame = self._frame("/v1/objects/put", header, sections)
        self._tracked.update(states)
        self._mark_synced(counts)
        self._base.update(frame.header.get("state_versions", {}))

    def get(self, name: str, *, pull: bool = True) -> Any:
        """The object put as ``"namespace/name"``, its states being the server's.

        Arguments:
            pull: fetch the values now (default); with False the local states hold
                ``None`` until ``client.pull`` (calls work without it).
        """
        frame = self._frame("/v1/objects/get", {"session": self._session, "name": name,
                                                "pull": pull})
        versions = frame.header.get("state_versions", {})
        values = dict(frame.section("states") or [])
        made: dict[str, State] = {}

        def load(ref: Any) -> State:
            _, state_id, cls, label, tag = ref
            if state_id not in made:
                state = self._tracked.get(state_id)
                if state is None:
                    state = cls.__new__(cls)
                    value = jax.device_put(values[state_id]) if state_id in values else None
                    state.__setstate__({"value": value, "id": state_id, "name": label,
                                        "tag": tag})
                elif state_id in values:
                    state.value = jax.device_put(values[state_id])
                made[state_id] = state
            return made[state_id]

        obj = frame.section("structure", load)
        for state_id, state in made.items():
            self._tracked[state_id] = state
            self._synced[state_id] = state.write_count
            if state_id in values:
                self._base[state_id] = versions[state_id]
                self._stale.discard(state_id)
            else:
                self._stale.add(state_id)
        return obj

    def list(self, namespace: str) -> list[dict[str, Any]]:
        """The objects of a namespace, each with its states' metadata."""
        return self._http.json("GET", f"/v1/namespaces/{namespace}/objects")["objects"]

    def info(self, name: str) -> dict[str, Any]:
        """Metadata of ``"namespace/name"``: states with shapes, dtypes, bytes, version,
        last writer, updated-at and status."""
        namespace, _, obj = name.partition("/")
        return self._http.json("GET", f"/v1/namespaces/{namespace}/objects/{obj}")

    def delete(self, name: str) -> None:
        """Deletes ``"namespace/name"`` and its states on the server."""
        namespace, _, obj = name.partition("/")
        self._http.json("DELETE", f"/v1/namespaces/{namespace}/objects/{obj}")

    def checkpoint(self, name: str) -> int:
        """Writes ``"namespace/name"`` (or a whole ``"namespace"``) to disk now."""
        namespace, _, obj = name.partition("/")
        params = {"name": obj} if obj else {}
        return self._http.json("POST", f"/v1/namespaces/{namespace}/checkpoint",
                               params=params)["flushed"]

    def register(self, name: str, mapping: RemoteMapping) -> dict[str, Any]:
        """Stores ``mapping`` (from ``client.pmap/vmap/jit``) on the server as
        ``"namespace/name"``, to be run with JSON by anyone with scope ``invoke``
        (``POST /v1/namespaces/{ns}/functions/{name}/invoke``). Every state it uses must
        be a named state of that namespace (``client.put`` them first).

        Returns:
            The function's input signature as the server recorded it.
        """
        packed = mapping.packed()
        header = {"session": self._session, "name": name,
                  "function": {"digest": packed.digest}, "refs": [s.id for s in packed.states]}
        frame = self._frame("/v1/functions/register", header, {"function": packed.section})
        return frame.header.get("signature", {})

    def _frame(self, path: str, header: dict[str, Any], sections: Any = None) -> Frame:
        return self._http.frame(path, encode(header, sections))

    # -- the call --------------------------------------------------------------
    def _call(self, mapping: RemoteMapping, args: tuple[Any, ...], kwargs: dict[str, Any]):
        for attempt in range(mapping.retries + 1):
            try:
                return self._call_once(mapping, args, kwargs)
            except StateConflictError as exc:
                if attempt == mapping.retries:
                    raise
                ids = [c["id"] for c in exc.conflicts]
                self.pull([self._tracked[i] for i in ids if i in self._tracked])
        raise AssertionError("unreachable")

    def _call_once(self, mapping: RemoteMapping, args: tuple[Any, ...], kwargs: dict[str, Any]):
        packed = mapping.packed()
        call_args = pack(_to_host((args, kwargs)))
        stream = default_stream()
        refs = {s.id: s for s in packed.states}
        refs.update((s.id, s) for s in call_args.states)
        refs[stream.id] = stream
        for attempt in range(3):
            uploads = [s for s in refs.values() if self._needs_upload(s)]
            counts = {s.id: s.write_count for s in uploads}
            header = {
                "session": self._session,
                "function": {"digest": packed.digest},
                "refs": list(refs),
                "uploads": {i: self._base.get(i) for i in counts},
                "default_stream": stream.id,
                "pull": mapping.pull,
                "pull_ids": [i for i in refs if i in self._stale] if mapping.pull else [],
            }
            sections = {"args": call_args}
            if packed.digest not in self._digests:
                sections["function"] = packed.section
            if uploads:
                sections["states"] = self._records(uploads)
            try:
                frame = self._frame("/v1/call", header, sections)
                break
            except RemoteExecutionError as exc:
                # The same error with file names filled in; chaining would print it twice.
                raise _localized(exc, mapping) from None
            except ProtocolError as exc:
                kind = exc.body.get("type")
                if attempt == 2 or kind not in {"FunctionNotCachedError", "SessionNotFoundError"}:
                    raise
                if kind == "FunctionNotCachedError":
                    self._digests.discard(packed.digest)
                else:
                    self._reopen(refs, "client call")
        self._digests.add(packed.digest)
        self._tracked.update(refs)
        self._mark_synced(counts)
        pulled = self._apply(frame, refs)
        written = set(frame.header.get("written", []))
        uploaded = frame.header.get("uploaded_versions", {})
        for state_id in counts:
            if state_id not in pulled and state_id in uploaded:
                self._base[state_id] = uploaded[state_id]
        self._stale.update(written - pulled)
        return frame.section("results")

    def _reopen(self, refs: Mapping[str, State], what: str) -> None:
        lost = [refs[i] for i in refs if i in self._stale]
        if lost:
            names = ", ".join(s.name or s.id[:8] for s in lost[:5])
            raise StateNotFoundError(
                _MSG_LOST_STATES.format(what=what, count=len(lost), names=names),
                body={"missing": [s.id for s in lost]},
            )
        self._open_session()


def _localized(exc: RemoteExecutionError, mapping: RemoteMapping) -> RemoteExecutionError:
    """The same error, with the user's file names in its remote traceback."""
    remote = exc.remote_traceback
    if not remote:
        return exc
    fixed = localize_traceback(remote, mapping.transform.origin_fun)
    body = {**exc.body, "traceback": fixed}
    return RemoteExecutionError(str(exc).replace(remote, fixed), status=exc.status, body=body)


def _token_for(url: str) -> str | None:
    token = os.environ.get("STATEHOST_TOKEN")
    if token:
        return token
    host = urllib.parse.urlsplit(url).hostname or ""
    loopback = host in {"localhost", "::1"} or host.startswith("127.")
    path = token_path()
    if loopback and path.is_file():
        return path.read_text().strip() or None
    return None


def connect(
    url: str = "http://127.0.0.1:8470",
    token: str | None = None,
    timeout: float = 60.0,
    *,
    transport: Any = None,
) -> Client:
    """Connects to a ``statehost serve`` and checks that versions match.

    Arguments:
        url: the server's URL.
        token: the bearer token. When omitted: ``$STATEHOST_TOKEN``, else (for a
            loopback URL) the token the local server wrote to
            ``$XDG_CONFIG_HOME/statehost/token``.
        timeout: seconds to wait for any answer.
        transport: an ``httpx`` transport to use instead of the network (tests).

    Returns:
        A :class:`Client`; close it, or use it as a context manager.

    Example:
        >>> with statehost.connect("http://127.0.0.1:8470") as client:  # doctest: +SKIP
        ...     print(client.devices())
    """
    return Client(
        base_url=url, timeout=timeout, auth=token or _token_for(url), transport=transport
    )
