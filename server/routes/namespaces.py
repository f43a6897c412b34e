"""``GET /v1/namespaces`` (what a token can see, for ``statehost ls``) and
``PUT /v1/namespaces/{ns}`` (a namespace's durability, scope admin, and its quotas, which
only a server token sets: a tenant's admin token cannot raise its own limits)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from statehost.server.deps import PrincipalDep, RuntimeDep, require_token
from statehost.server.errors import (
    ClusterUnavailableError,
    ForbiddenError,
    NotFoundError,
    ValidationError,
)
from statehost.server.openapi import errors
from statehost.server.persistence import Durability
from statehost.server.persistence.database import QUOTA_FIELDS
from statehost.server.settings import parse_size

__all__ = ["NamespaceBody", "router"]

router = APIRouter(prefix="/v1/namespaces", tags=["namespaces"],
                   dependencies=[Depends(require_token)])

_MSG_NOTHING = (
    "{where}: the body sets nothing. Fix: give durability and/or quotas, e.g. "
    '{{"max_bytes": "8GiB", "max_sessions": 4}} (null clears a quota: the server default '
    "applies again)."
)

_MSG_OPERATOR_ONLY = (
    "{where}: quotas are set by the box's operator: this token is admin of {namespace!r} "
    "only, and a tenant cannot raise its own limits. Fix: use a server token (STATEHOST_TOKENS, "
    "or the token `statehost serve` generated on the server's machine); this token may still "
    "set the namespace's durability."
)


# Up to 2**53 (8 PiB): exact as a JSON number (a schema's maximum is compared as a float)
# and as SQLite's 64-bit integer. A size string has at most 6 digits before a unit of at
# most GiB, which keeps "999999.9GiB" under that too.
_MAX = 2**53
_SIZE_PATTERN = r"^[0-9]{1,6}(\.[0-9]{1,6})? ?([KMG]i?B|B)?$"


def _size(value: object) -> object:
    """A quota in bytes: an integer, or a size with a unit ("8GiB", "512MiB")."""
    if isinstance(value, bool):  # JSON true/false are not sizes (pydantic would take 0/1)
        raise ValueError("a size is an integer or a string such as '8GiB', not true/false")
    if isinstance(value, str):
        if not re.match(_SIZE_PATTERN, value):
            raise ValueError(f"size {value!r} is not understood; write bytes (8589934592) "
                             "or a number with a unit (8GiB, 512MiB, 100MB)")
        return parse_size(value)
    return value


_Bytes = Annotated[
    Annotated[int, Field(ge=0, le=_MAX)] | None, BeforeValidator(_size),
    WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0, "maximum": _MAX},
                              {"type": "string", "pattern": _SIZE_PATTERN},
                              {"type": "null"}]}),
]


def _count(value: object) -> object:
    # JSON true/false and "3" are not counts (pydantic's lax mode would take 1, 0 and 3).
    if isinstance(value, bool | str):
        raise ValueError(f"a count is an integer (4), not {value!r}")
    return value


_Count = Annotated[Annotated[int, Field(ge=1, le=_MAX)] | None, BeforeValidator(_count)]


class NamespaceBody(BaseModel):
    """What to change; a field left out is kept, a quota given as null is cleared (the
    server's default, ``STATEHOST_DEFAULT_MAX_*``, applies again)."""

    # Unknown fields are refused (a typo must not look like success); an empty body too.
    model_config = ConfigDict(extra="forbid", json_schema_extra={"minProperties": 1})

    durability: Durability = Field(None, description="sync, interval or none")  # type: ignore[assignment]
    max_bytes: _Bytes = Field(None, description="bytes on all devices together (8GiB)")
    max_bytes_per_device: _Bytes = Field(None, description="bytes on any one device")
    max_sessions: _Count = Field(None, description="open sessions")
    max_queued: _Count = Field(None, description="calls waiting in the queue")


def _describe(rt: Any, name: str, durability: str) -> dict[str, Any]:
    usage = rt.store.ledger.namespace(name)
    return {"name": name, "durability": durability, "resident_bytes": rt.store.nbytes(name),
            "ledger": usage.describe(), "quotas": rt.quotas.describe(name),
            "sessions": rt.quotas.sessions_of(name), "queued": rt.quotas.queued_of(name)}


@router.get("", summary="The namespaces this token may read")
def list_namespaces(rt: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """Each namespace with its durability, the bytes its named states hold
    (``resident_bytes``), its open ``sessions`` and ``queued`` calls, its byte ledger
    (``ledger``: every device, named states and its sessions' anonymous ones) and its
    quotas in effect (``quotas``; ``own`` are the ones it sets itself). A namespace whose
    sessions hold states before it has any named one is listed too."""
    known = {name: str(d) for name, d in rt.registry.db.namespaces().items()}
    for name in rt.store.ledger.by_namespace():
        known.setdefault(name, str(rt.persistence.default_durability))
    return {"namespaces": [_describe(rt, name, durability)
                           for name, durability in sorted(known.items())
                           if principal.can(name, "read")]}


@router.put("/{namespace}", summary="Set a namespace's durability (scope admin) and quotas "
            "(a server token)", responses=errors(NotFoundError, ForbiddenError, ValidationError,
                                                 ClusterUnavailableError))
def set_namespace(namespace: str, body: NamespaceBody, rt: RuntimeDep,
                  principal: PrincipalDep) -> dict[str, Any]:
    where = f"PUT /v1/namespaces/{namespace}"
    rt.registry.visible(principal, namespace, "admin", where)
    quotas = {name: getattr(body, name) for name in QUOTA_FIELDS if name in body.model_fields_set}
    if body.durability is None and not quotas:
        raise ValidationError(_MSG_NOTHING.format(where=where))
    if quotas and principal.namespace is not None:
        raise ForbiddenError(_MSG_OPERATOR_ONLY.format(where=where, namespace=namespace))
    if body.durability is not None:
        rt.set_durability(namespace, body.durability, where)
    if quotas:
        rt.persistence.set_quotas(namespace, quotas)
    out: dict[str, Any] = {"namespace": namespace,
                           "durability": str(rt.persistence.durability(namespace))}
    if quotas:  # the quotas in effect now, when the body set some
        out["quotas"] = rt.quotas.describe(namespace)
    return out
