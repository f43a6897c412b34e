"""``GET /v1/namespaces`` (what a token can see, for ``statehost ls``) and
``PUT /v1/namespaces/{ns}`` (a namespace's durability, scope admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from statehost.server.deps import PrincipalDep, RuntimeDep, require_token
from statehost.server.errors import NotFoundError, ValidationError
from statehost.server.openapi import errors
from statehost.server.persistence import Durability

__all__ = ["NamespaceBody", "router"]

router = APIRouter(prefix="/v1/namespaces", tags=["namespaces"],
                   dependencies=[Depends(require_token)])


class NamespaceBody(BaseModel):
    durability: Durability


@router.get("", summary="The namespaces this token may read")
def list_namespaces(rt: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """Each namespace with its durability and the bytes its states hold on the devices."""
    return {"namespaces": [
        {"name": name, "durability": durability, "resident_bytes": rt.store.nbytes(name)}
        for name, durability in rt.registry.db.namespaces().items()
        if principal.can(name, "read")
    ]}


@router.put("/{namespace}", summary="Set a namespace's durability (scope admin)",
            responses=errors(NotFoundError, ValidationError))
def set_namespace(namespace: str, body: NamespaceBody, rt: RuntimeDep,
                  principal: PrincipalDep) -> dict[str, str]:
    where = f"PUT /v1/namespaces/{namespace}"
    rt.registry.visible(principal, namespace, "admin", where)
    rt.persistence.set_durability(namespace, body.durability)
    return {"namespace": namespace, "durability": str(body.durability)}
