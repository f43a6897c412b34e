"""``GET /v1/namespaces`` (what a token can see, for ``statehost ls``) and
``PUT /v1/namespaces/{ns}`` (a namespace's durability and quotas, scope admin)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, BeforeValidator, Field

from statehost.server.deps import PrincipalDep, RuntimeDep, require_token
from statehost.server.errors import NotFoundError, ValidationError
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


def _size(value: object) -> object:
    """A quota in bytes: an integer, or a size with a unit ("8GiB", "512MiB")."""
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError:
            raise ValueError(f"size {value!r} is not understood; write bytes (8589934592) "
                             "or a number with a unit (8GiB, 512MiB, 100MB)") from None
    return value


_Bytes = Annotated[Annotated[int, Field(ge=0)] | None, BeforeValidator(_size)]


class NamespaceBody(BaseModel):
    """What to change; a field left out is kept, a quota given as null is cleared (the
    server's default, ``STATEHOST_DEFAULT_MAX_*``, applies again)."""

    durability: Durability | None = None
    max_bytes: _Bytes = Field(None, description="bytes on all devices together (8GiB)")
    max_bytes_per_device: _Bytes = Field(None, description="bytes on any one device")
    max_sessions: int | None = Field(None, ge=1, description="open sessions")
    max_queued: int | None = Field(None, ge=1, description="calls waiting in the queue")


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


@router.put("/{namespace}", summary="Set a namespace's durability and quotas (scope admin)",
            responses=errors(NotFoundError, ValidationError))
def set_namespace(namespace: str, body: NamespaceBody, rt: RuntimeDep,
                  principal: PrincipalDep) -> dict[str, Any]:
    where = f"PUT /v1/namespaces/{namespace}"
    rt.registry.visible(principal, namespace, "admin", where)
    quotas = {name: getattr(body, name) for name in QUOTA_FIELDS if name in body.model_fields_set}
    if body.durability is None and not quotas:
        raise ValidationError(_MSG_NOTHING.format(where=where))
    if body.durability is not None:
        rt.persistence.set_durability(namespace, body.durability)
    if quotas:
        rt.persistence.set_quotas(namespace, quotas)
    out: dict[str, Any] = {"namespace": namespace,
                           "durability": str(rt.persistence.durability(namespace))}
    if quotas:  # the quotas in effect now, when the body set some
        out["quotas"] = rt.quotas.describe(namespace)
    return out
