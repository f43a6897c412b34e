"""``GET /v1/health``: open to everyone, for load balancers and healthchecks."""

from fastapi import APIRouter

from statehost.server.deps import RuntimeDep

router = APIRouter(prefix="/v1", tags=["health"])


@router.get("/health",
            summary="ok, or degraded with a reason (open: no token)")
def health(rt: RuntimeDep) -> dict[str, str]:
    """``ok``, or ``degraded`` with a reason while named states cannot be written to disk."""
    problem = rt.persistence.problem()
    return {"status": "ok"} if problem is None else {"status": "degraded", "reason": problem}
