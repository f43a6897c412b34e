"""``RemoteMapping``: a local transform whose calls run on the server.

It wraps the very ``StatefulMapping`` / ``StatefulFunction`` that the local
``pmap`` / ``vmap`` / ``jit`` build (so arguments are checked exactly as
locally), pickles it once with its states as references, and hands each call
to the client.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import linecache
import re
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from statehost._state import State
from statehost.wire import Section, pack

if TYPE_CHECKING:
    from statehost.client._client import Client

__all__ = ["RemoteDevice", "RemoteMapping", "localize_traceback"]

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

    def __repr__(self) -> str:
        return f"RemoteDevice(id={self.id}, platform={self.platform!r}, kind={self.kind!r})"


@dataclass
class _Packed:
    section: Section
    digest: str
    states: list[State]


class RemoteMapping:
    """Calls ``transform`` on the server of ``client``; see ``Client.pmap``.

    The transform is pickled at its first call and that pickle is reused, as
    ``jax.jit`` keeps its first trace: build a new mapping to ship changed code.
    """

    def __init__(self, client: Client, transform: Any, *, pull: bool = True, retries: int = 0):
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"client transform: retries={retries!r} must be an int >= 0.")
        self._client = client
        self._transform = transform
        self._packed: _Packed | None = None
        self.pull = bool(pull)
        self.retries = retries
        functools.update_wrapper(self, transform, updated=())

    @property
    def transform(self) -> Any:
        """The local transform this mapping ships (``StatefulMapping`` / ``StatefulFunction``)."""
        return self._transform

    def packed(self) -> _Packed:
        if self._packed is None:
            section = pack(self._transform)
            digest = hashlib.sha256(section.payload).hexdigest()
            self._packed = _Packed(section, digest, section.states)
        return self._packed

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._transform, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._client._call(self, args, kwargs)

    def __repr__(self) -> str:
        return f"Remote({self._transform!r} on {self._client.url}, pull={self.pull})"


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


def localize_traceback(text: str, fun: Any) -> str:
    """Names the user's files and source lines in a remote traceback.

    Frames of code shipped by value read ``File "<dynamic-code>"`` on the
    server; each is matched to the user's function by name and line.
    """
    codes: dict[tuple[str, int], types.CodeType] = {}
    _code_objects(fun, set(), codes)

    def fix(match: re.Match[str]) -> str:
        line, name = int(match.group(1)), match.group(2)
        code = codes.get((name, line))
        if code is None:
            return match.group(0)
        source = linecache.getline(code.co_filename, line).strip()
        frame = f'  File "{code.co_filename}", line {line}, in {name}'
        return frame + (f"\n    {source}" if source else "")

    return _DYNAMIC_FRAME.sub(fix, text)
