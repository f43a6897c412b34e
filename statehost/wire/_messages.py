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
Seconds = float | None  # a duration in seconds, 0 < x <= 1e9, or null


def _seconds(x: Any) -> bool:
    return x is None or (type(x) in (int, float) and 0 < x <= 1e9)


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


# annotation -> (description, check of the decoded JSON value ``x``, its conversion), both
# as Python expressions: each message class compiles them into its own decoder (_codec).
_RULES: dict[Any, tuple[str, str, str]] = {
    str: ("a string", "isinstance(x, str)", "str(x)"),
    str | None: ("a string or null", "x is None or isinstance(x, str)", "x"),
    bool: ("true or false", "isinstance(x, bool)", "bool(x)"),
    int: ("an integer >= 0", "_version(x)", "int(x)"),
    Ids: ("a list of state ids (32 hex digits)",
          "isinstance(x, list) and all(map(is_state_id, x))", "tuple(x)"),
    Bases: ("an object of state id -> version or null",
            "isinstance(x, dict) and all(is_state_id(k) and (v is None or _version(v)) "
            "for k, v in x.items())", "dict(x)"),
    Versions: ("an object of state id -> version",
               "isinstance(x, dict) and all(is_state_id(k) and _version(v) "
               "for k, v in x.items())", "dict(x)"),
    Paths: ("an object of state id -> path string",
            "isinstance(x, dict) and all(is_state_id(k) and isinstance(v, str) "
            "for k, v in x.items())", "dict(x)"),
    Json: ("a JSON object", "isinstance(x, dict)", "dict(x)"),
    Flags: ("a list of true/false",
            "isinstance(x, list) and all(isinstance(v, bool) for v in x)", "tuple(x)"),
    Names: ("a list of strings of 1 to 64 characters", "_short_names(x)", "tuple(x)"),
    Seconds: ("a number of seconds above 0 (at most 1e9), or null", "_seconds(x)", "x"),
}


class _Field(typing.NamedTuple):
    """A header field, with its rule looked up once per class."""

    name: str
    want: str
    check: str  # an expression of the JSON value ``x``
    convert: str  # likewise
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


def _no_section(cls: type[Message], name: str, frame: Frame) -> WireError:
    return WireError(
        f"statehost wire: {cls.__name__} needs a {name!r} section and the frame "
        f"has only {sorted(frame.sections) or 'none'}. Fix: send messages built "
        "by statehost's client."
    )


@functools.cache
def _codec(cls: type[Message]) -> tuple[Callable[[Any], Encoded], Callable[[Frame], Any]]:
    """``(to_frame, from_frame)`` of ``cls``, compiled from its layout once per class.

    Every frame goes through these on both sides of every call; a loop over the
    ``_Field``s, with a call per rule, cost about twice as much per message as code
    with the fields and rules spelled out. Decoding checks fields in declaration
    order, so the first bad field is the one reported, as before.
    """
    header, sections = _layout(cls)
    env: dict[str, Any] = {
        "cls": cls, "encode": encode, "MISSING": dataclasses.MISSING, "_fault": _fault,
        "_no_section": _no_section, "_version": _version, "is_state_id": is_state_id,
        "_seconds": _seconds, "_short_names": _short_names, "want_kind": repr(cls.kind),
    }
    put = ", ".join(f"{f.name!r}: " + (f"list(self.{f.name})" if f.as_list else f"self.{f.name}")
                    for f in header)
    to_frame = ["def to_frame(self):", f"    header = {{'kind': self.kind, {put}}}",
                "    sections = {}"]
    for name, _ in sections:
        to_frame += [f"    if self.{name} is not None:",
                     f"        sections[{name!r}] = self.{name}"]
    to_frame.append("    return encode(header, sections)")

    from_frame = [
        "def from_frame(frame):",
        "    header = frame.header",
        f"    if header.get('kind') != {cls.kind!r}:",
        "        raise _fault(cls, 'kind', want_kind, header.get('kind', MISSING))",
    ]
    for i, f in enumerate(header):
        env[f"want{i}"], env[f"default{i}"] = f.want, f.default
        from_frame += [f"    x = header.get({f.name!r}, MISSING)", "    if x is MISSING:"]
        from_frame.append(f"        raise _fault(cls, {f.name!r}, want{i}, x)"
                          if f.default is dataclasses.MISSING else f"        v{i} = default{i}")
        from_frame += [f"    elif {f.check}:", f"        v{i} = {f.convert}", "    else:",
                       f"        raise _fault(cls, {f.name!r}, want{i}, x)"]
    from_frame.append("    sections = frame.sections")
    for j, (name, required) in enumerate(sections):
        from_frame.append(f"    s{j} = sections.get({name!r})")
        if required:
            from_frame += [f"    if s{j} is None:",
                           f"        raise _no_section(cls, {name!r}, frame)"]
    fields = [f"{f.name}=v{i}" for i, f in enumerate(header)]
    fields += [f"{name}=s{j}" for j, (name, _) in enumerate(sections)]
    from_frame.append(f"    return cls({', '.join(fields)})")
    code = "\n".join(to_frame) + "\n\n" + "\n".join(from_frame) + "\n"
    exec(compile(code, f"<statehost.wire codec of {cls.__name__}>", "exec"), env)
    return env["to_frame"], env["from_frame"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Message:
    """Base of every message; subclasses declare their fields."""

    kind: ClassVar[str]

    def to_frame(self) -> Encoded:
        return _codec(type(self))[0](self)

    @classmethod
    def from_frame(cls, frame: Frame) -> Self:
        return _codec(cls)[1](frame)


# -- calls ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class CallRequest(Message):
    """Run a shipped transform.

    ``digest`` is the sha256 of the ``function`` section's pickle; the section is
    sent only when the server may not have it cached. ``refs`` lists every state
    the call may touch; ``uploads`` the ones whose values travel in ``states``
    (``StateRecord``s), each with the version it is based on. ``args`` holds
    ``(args, kwargs)``. With ``pull``, the written states and ``pull_ids`` come back.

    With ``keep_outputs`` (asynchronous dispatch), the outputs also stay on the server as
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
    keep_outputs: bool = False
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
