"""``GET /v1/namespaces``: the namespaces a token can see, for operators (``statehost ls``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from statehost.server.deps import PrincipalDep, RuntimeDep, require_token

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Depends(require_token)])


@router.get("/namespaces", summary="The namespaces this token may read")
def list_namespaces(rt: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """Each namespace with its durability and the bytes its states hold on the devices."""
    return {"namespaces": [
        {"name": name, "durability": durability, "resident_bytes": rt.store.nbytes(name)}
        for name, durability in rt.registry.db.namespaces().items()
        if principal.can(name, "read")
    ]}
