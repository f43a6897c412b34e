"""``RemotePlacement``: the placement of a transform whose calls run on a server.

``client.pmap`` / ``vmap`` / ``jit`` / ``StatefulMapping`` build the very
transform the local ones build (so arguments are checked exactly as locally,
and ``type()`` / ``isinstance`` are the seed's) and place it on the client's
server (``statehost.transform._placement``). The placement pickles the
transform once, with its states as references, and hands each call to the
client. The server's tracebacks name the user's files and notebook cells again
(:func:`localize_traceback`).
"""

from __future__ import annotations

import hashlib
import inspect
import linecache
import re
import sys
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from statehost._state import State
from statehost.wire import Section, pack

if TYPE_CHECKING:
    from statehost.client._client import Client

__all__ = ["RemoteDevice", "RemotePlacement", "localize_traceback"]

# cloudpickle ships code with co_filename "<dynamic-code>" (cloudpickle.py, _code_reduce),
# so the server's traceback cannot name the user's files; the client can.
_DYNAMIC_FRAME = re.compile(r'^  File "<dynamic-code>", line (\d+), in (\S+)$', re.MULTILINE)


@dataclass(frozen=True)
class RemoteDevice:
    """A device of the server, usable as ``devices=`` of ``client.pmap``.

    Only ``platform`` and ``id`` travel; the server maps them back to its own
    ``jax.Device`` objects.
    """

    id: int
    platform: str
    kind: str
    memory: int | None = None
    process_index: int = 0  # which process of a server group holds it (0 on one process)

    def __repr__(self) -> str:
        return f"RemoteDevice(id={self.id}, platform={self.platform!r}, kind={self.kind!r})"


@dataclass
class _Packed:
    section: Section
    digest: str
    states: list[State]


class RemotePlacement:
    """Runs a transform's calls on the server of ``client``; see ``Client.pmap``.

    The client makes one for each transform it builds. The transform is pickled
    at its first call and that pickle is reused, as ``jax.jit`` keeps its first
    trace: build a new transform to ship changed code.

    Attributes:
        client: the ``Client`` whose server runs the calls.
        pull: write the updated state values into the local ``State`` objects
            after each call (``False``: they stay on the server until ``client.pull``).
        retries: how many times a call that met a ``StateConflictError`` pulls
            the conflicting states and runs again.
        timeout: seconds a call may wait on the server before it starts.
        sync: every call is a blocking round trip (``jax.Array`` outputs), even when
            the client dispatches asynchronously.
    """

    def __init__(self, client: Client, *, pull: bool = True, retries: int = 0,
                 sync: bool = False, timeout: float | None = None):
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"client transform: retries={retries!r} must be an int >= 0.")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, int | float) or not 0 < timeout < float("inf")):
            raise ValueError(f"client transform: timeout={timeout!r} must be a number of "
                             "seconds > 0, or None for the server's --call-timeout.")
        self.timeout = None if timeout is None else float(timeout)
        self.client = client
        self.pull = bool(pull)
        self.retries = retries
        self.sync = bool(sync)
        self._packed: _Packed | None = None
        self._packed_for: Any = None

    def packed(self, transform: Any) -> _Packed:
        """``transform``'s pickle (states as references), its digest and its states."""
        if self._packed is None or self._packed_for is not transform:
            section = pack(transform)
            digest = hashlib.sha256(section.payload).hexdigest()
            self._packed, self._packed_for = _Packed(section, digest, section.states), transform
        return self._packed

    def run(self, transform: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.client._call(transform, self, args, kwargs)

    def __repr__(self) -> str:
        return f"RemotePlacement({self.client.url!r}, pull={self.pull})"

    def describe(self) -> dict[str, str]:
        """Where and how the transform runs, for its notebook display (no request)."""
        cached = self._packed is not None and self.client._ledger.has_function(
            self._packed.digest)
        return {"runs on": self.client.url,
                "pull": "updated states come back with each call" if self.pull
                else "states stay on the server until client.pull",
                "dispatch": "blocking" if self.sync or self.client.dispatch == "sync"
                else "asynchronous after the first call of a signature",
                "cached on the server": "yes" if cached else "not yet (sent at the next call)"}


def _code_objects(obj: Any, seen: set[int], out: dict[tuple[str, int], types.CodeType]) -> None:
    """Collects the code objects reachable from a function, method, class or Module."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, types.MethodType):
        _code_objects(obj.__func__, seen, out)
        _code_objects(type(obj.__self__), seen, out)
    elif isinstance(obj, types.FunctionType):
        _code_objects(obj.__code__, seen, out)
        for cell in obj.__closure__ or ():
            try:
                _code_objects(cell.cell_contents, seen, out)
            except ValueError:  # an empty cell
                pass
    elif isinstance(obj, types.CodeType):
        first, last = obj.co_firstlineno, max(
            (line for _, _, line in obj.co_lines() if line is not None),
            default=obj.co_firstlineno)
        for line in range(first, last + 1):
            out.setdefault((obj.co_name, line), obj)
        for const in obj.co_consts:
            if isinstance(const, types.CodeType):
                _code_objects(const, seen, out)
    elif isinstance(obj, type):
        if obj.__module__.startswith(("statehost", "builtins", "jax")):
            return
        for klass in obj.__mro__:
            for member in vars(klass).values():
                if inspect.isfunction(member):
                    _code_objects(member, seen, out)
    elif callable(obj):
        _code_objects(type(obj), seen, out)


def _cell_label(filename: str) -> str | None:
    """``Cell In[2]`` when ``filename`` is the file IPython compiled a cell into.

    Asks the running IPython, as its own tracebacks do (``IPython.core.tbtools``,
    ``shell.compile.format_code_name``, IPython >= 8); never imports IPython.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    name_code = getattr(getattr(shell, "compile", None), "format_code_name", None)
    found = name_code(filename) if name_code is not None else None
    return None if found is None else f"{found[0]} {found[1]}"


def _frame_line(filename: str, line: int, name: str) -> str:
    label = _cell_label(filename)
    if label is not None:
        return f"  {label}, line {line}, in {name}"
    return f'  File "{filename}", line {line}, in {name}'


def localize_traceback(text: str, fun: Any) -> str:
    """Names the user's files and source lines in a remote traceback.

    Frames of code shipped by value read ``File "<dynamic-code>"`` on the
    server; each is matched to the user's function by name and line and named
    as a local traceback names it: ``File "script.py", line 5``, or
    ``Cell In[2], line 5`` for code from a notebook cell.
    """
    codes: dict[tuple[str, int], types.CodeType] = {}
    _code_objects(fun, set(), codes)

    def fix(match: re.Match[str]) -> str:
        line, name = int(match.group(1)), match.group(2)
        code = codes.get((name, line))
        if code is None:
            return match.group(0)
        source = linecache.getline(code.co_filename, line).strip()
        frame = _frame_line(code.co_filename, line, name)
        return frame + (f"\n    {source}" if source else "")

    return _DYNAMIC_FRAME.sub(fix, text)
