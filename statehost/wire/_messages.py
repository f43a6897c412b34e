"""Typed messages: one class per frame kind, each header key spelled once, here.

Every binary endpoint sends and receives exactly one of these. A message is a
frozen dataclass: its header fields are JSON values, its ``Section`` fields
are pickled sections of the frame. ``to_frame()`` encodes it;
``from_frame(frame)`` checks every field's type (unknown keys are ignored,
missing or ill-typed ones are refused with a :class:`WireError` naming the
message and the field) and never unpickles anything: the receiver loads each
section with the ``load_state`` it needs.

===================  ===========================  =======================
request              reply                        endpoint
===================  ===========================  =======================
``CallRequest``      ``CallReply``                ``POST /v1/call``
``PushRequest``      ``PushReply``                ``POST /v1/states/push``
``PullRequest``      ``PullReply``                ``POST /v1/states/pull``
``PutRequest``       ``PutReply``                 ``POST /v1/objects/put``
``GetRequest``       ``GetReply``                 ``POST /v1/objects/get``
``RegisterRequest``  ``RegisterReply``            ``POST /v1/functions/register``
===================  ===========================  =======================
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from collections.abc import Callable
from typing import Any, ClassVar, Self

from statehost._errors import WireError
from statehost.wire._frame import Encoded, Frame, encode
from statehost.wire._pickle import Section

__all__ = [
    "CallReply",
    "CallRequest",
    "GetReply",
    "GetRequest",
    "Message",
    "PullReply",
    "PullRequest",
    "PushReply",
    "PushRequest",
    "PutReply",
    "PutRequest",
    "RegisterReply",
    "RegisterRequest",
    "is_state_id",
]

_HEX_ID = re.compile(r"^[0-9a-f]{32}$")

# Header field types. Aliases, so each field's rule reads off its annotation.
StateId = str  # 32 lowercase hex digits (a uuid4 hex)
Ids = tuple[str, ...]  # a JSON list of state ids
Bases = dict[str, int | None]  # state id -> the version an upload is based on
Versions = dict[str, int]  # state id -> version
Paths = dict[str, str]  # state id -> path inside an object
Json = dict[str, Any]  # any JSON object
Flags = tuple[bool, ...]  # a JSON list of true/false
ShortName = typing.NewType("ShortName", str)  # a call id or an array handle's name
Names = tuple[ShortName, ...]  # a JSON list of them
Seconds = float | None  # a duration in seconds >= 0, or null


def _seconds(x: Any) -> bool:
    return x is None or (type(x) in (int, float) and 0 <= x < float("inf"))


def _short_names(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, str) and 0 < len(v) <= 64 for v in x)


def is_state_id(value: Any) -> bool:
    """A state (or session) id: 32 lowercase hex digits."""
    return isinstance(value, str) and _HEX_ID.match(value) is not None


def _fault(message: type[Message], name: str, want: str, got: Any) -> WireError:
    shown = "missing" if got is dataclasses.MISSING else f"{type(got).__name__} {got!r:.80}"
    return WireError(
        f"statehost wire: {message.__name__} header field {name!r} must be {want}; got "
        f"{shown}. Fix: send messages built by statehost's client of the server's version."
    )


def _version(x: Any) -> bool:
    return type(x) is int and x >= 0


# annotation -> (description, check of the decoded JSON value, conversion)
_RULES: dict[Any, tuple[str, Callable[[Any], bool], Callable[[Any], Any]]] = {
    str: ("a string", lambda x: isinstance(x, str), str),
    str | None: ("a string or null", lambda x: x is None or isinstance(x, str), lambda x: x),
    bool: ("true or false", lambda x: isinstance(x, bool), bool),
    int: ("an integer >= 0", _version, int),
    Ids: ("a list of state ids (32 hex digits)",
          lambda x: isinstance(x, list) and all(map(is_state_id, x)), tuple),
    Bases: ("an object of state id -> version or null",
            lambda x: isinstance(x, dict) and all(
                is_state_id(k) and (v is None or _version(v)) for k, v in x.items()), dict),
    Versions: ("an object of state id -> version",
               lambda x: isinstance(x, dict) and all(
                   is_state_id(k) and _version(v) for k, v in x.items()), dict),
    Paths: ("an object of state id -> path string",
            lambda x: isinstance(x, dict) and all(
                is_state_id(k) and isinstance(v, str) for k, v in x.items()), dict),
    Json: ("a JSON object", lambda x: isinstance(x, dict), dict),
    Flags: ("a list of true/false",
            lambda x: isinstance(x, list) and all(isinstance(v, bool) for v in x), tuple),
    Names: ("a list of strings of 1 to 64 characters", _short_names, tuple),
    Seconds: ("a number of seconds >= 0, or null", _seconds, lambda x: x),
}


class _Field(typing.NamedTuple):
    """A header field, with its rule looked up once (this runs on every frame)."""

    name: str
    want: str
    check: Callable[[Any], bool]
    convert: Callable[[Any], Any]
    default: Any
    as_list: bool  # sent as a JSON list (a tuple here)


@functools.cache
def _layout(cls: type[Message]) -> tuple[list[_Field], list[tuple[str, bool]]]:
    """``(header fields, sections as (name, required))`` of a message class."""
    hints = typing.get_type_hints(cls, globals())
    header, sections = [], []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if kind in (Section, Section | None):
            sections.append((f.name, kind is Section))
        else:
            assert kind in _RULES, (cls, f.name, kind)
            default = f.default if f.default_factory is dataclasses.MISSING \
                else f.default_factory()
            header.append(_Field(f.name, *_RULES[kind], default, kind in (Ids, Flags, Names)))
    return header, sections


@dataclasses.dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message; subclasses declare their fields."""

    kind: ClassVar[str]

    def to_frame(self) -> Encoded:
        header_fields, section_fields = _layout(type(self))
        header: dict[str, Any] = {"kind": self.kind}
        for field in header_fields:
            value = getattr(self, field.name)
            header[field.name] = list(value) if field.as_list else value
        sections = {name: getattr(self, name) for name, _ in section_fields
                    if getattr(self, name) is not None}
        return encode(header, sections)

    @classmethod
    def from_frame(cls, frame: Frame) -> Self:
        header_fields, section_fields = _layout(cls)
        values: dict[str, Any] = {}
        kind = frame.header.get("kind")
        if kind != cls.kind:
            raise _fault(cls, "kind", repr(cls.kind), frame.header.get("kind",
                                                                        dataclasses.MISSING))
        header = frame.header
        for name, want, check, convert, default, _ in header_fields:
            if name not in header:
                if default is dataclasses.MISSING:
                    raise _fault(cls, name, want, default)
                values[name] = default
                continue
            raw = header[name]
            if not check(raw):
                raise _fault(cls, name, want, raw)
            values[name] = convert(raw)
        for name, required in section_fields:
            section = frame.sections.get(name)
            if section is None and required:
                raise WireError(
                    f"statehost wire: {cls.__name__} needs a {name!r} section and the frame "
                    f"has only {sorted(frame.sections) or 'none'}. Fix: send messages built "
                    "by statehost's client."
                )
            values[name] = section
        return cls(**values)


# -- calls ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class CallRequest(Message):
    """Run a shipped transform.

    ``digest`` is the sha256 of the ``function`` section's pickle; the section is
    sent only when the server may not have it cached. ``refs`` lists every state
    the call may touch; ``uploads`` the ones whose values travel in ``states``
    (``StateRecord``s), each with the version it is based on. ``args`` holds
    ``(args, kwargs)``. With ``pull``, the written states and ``pull_ids`` come back.

    With ``keep`` (asynchronous dispatch), the outputs also stay on the server as
    arrays named ``"{call_id}:{leaf index}"`` (``FetchRequest`` reads them,
    ``FreeRequest`` drops them). ``returns`` says what the reply's ``results`` hold:
    ``"values"`` (the outputs' host copies) or ``"none"`` (nothing: an asynchronous
    call's outputs are read later, if ever). ``expect`` is what the client predicts
    the outputs are (``outputs_signature``): a call whose outputs differ is refused
    before it commits. ``timeout``: the call is dropped if it has not started
    within that many seconds.
    """

    kind: ClassVar[str] = "call"
    session: str
    call_id: str | None = None
    digest: str
    refs: Ids = ()
    uploads: Bases = dataclasses.field(default_factory=dict)
    default_stream: str | None = None
    pull: bool = False
    pull_ids: Ids = ()
    keep: bool = False
    returns: str = "values"
    expect: str | None = None
    timeout: Seconds = None
    function: Section | None = None
    args: Section
    states: Section | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class CallReply(Message):
    """The outputs (``results``), what was written, and the states' new versions.

    ``results`` holds the outputs' host copies (numpy arrays); ``weak_types`` says, for
    each of its leaves in ``jax.tree_util.tree_leaves`` order, whether the output was a
    weakly typed ``jax.Array``, so the client rebuilds the arrays the call returned.
    """

    kind: ClassVar[str] = "call-reply"
    call_id: str
    written: Ids = ()
    compiled: int = 0
    state_versions: Versions = dataclasses.field(default_factory=dict)
    uploaded_versions: Versions = dataclasses.field(default_factory=dict)
    weak_types: Flags = ()
    results: Section | None = None  # None only for ``returns="none"``
    states: Section | None = None


# -- moving state values -------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class PushRequest(Message):
    """Store these uploaded values (``StateRecord``s in ``states``): all, or none."""

    kind: ClassVar[str] = "push"
    session: str
    uploads: Bases = dataclasses.field(default_factory=dict)
    states: Section


@dataclasses.dataclass(frozen=True, kw_only=True)
class PushReply(Message):
    kind: ClassVar[str] = "push-reply"
    stored: Ids = ()
    state_versions: Versions = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PullRequest(Message):
    """The current values of ``ids``."""

    kind: ClassVar[str] = "pull"
    session: str
    call_id: str | None = None  # on the call stream, to match the reply
    ids: Ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class PullReply(Message):
    """``StateValue``s in ``states``, and each state's version."""

    kind: ClassVar[str] = "pull-reply"
    call_id: str | None = None
    state_versions: Versions = dataclasses.field(default_factory=dict)
    states: Section


# -- named objects -------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class PutRequest(Message):
    """Name an object ``namespace/name``: its structure (a pickle whose states are
    references), each state's path in it, and the values the server lacks."""

    kind: ClassVar[str] = "put"
    session: str
    name: str
    object_kind: str = "object"
    paths: Paths
    uploads: Bases = dataclasses.field(default_factory=dict)
    structure: Section
    states: Section | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PutReply(Message):
    kind: ClassVar[str] = "put-reply"
    state_versions: Versions = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GetRequest(Message):
    kind: ClassVar[str] = "get"
    session: str
    name: str
    pull: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class GetReply(Message):
    """The object's ``structure`` and, when pulled, its ``StateValue``s."""

    kind: ClassVar[str] = "get-reply"
    object_kind: str = "object"
    state_versions: Versions = dataclasses.field(default_factory=dict)
    structure: Section
    states: Section | None = None


# -- registered functions ------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class RegisterRequest(Message):
    """Store the transform in ``function`` as ``namespace/name`` for JSON invokes."""

    kind: ClassVar[str] = "register"
    session: str
    name: str
    digest: str
    refs: Ids = ()
    function: Section


@dataclasses.dataclass(frozen=True, kw_only=True)
class RegisterReply(Message):
    kind: ClassVar[str] = "register-reply"
    name: str
    digest: str
    state_ids: Ids = ()
    signature: Json = dataclasses.field(default_factory=dict)
