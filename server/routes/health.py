"""``GET /v1/health``: open to everyone, for load balancers and healthchecks."""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from statehost.server.deps import RuntimeDep

router = APIRouter(prefix="/v1", tags=["health"])


@router.get("/health",
            summary="ok, or degraded with a reason (open: no token); a group's leader "
                    "answers 503 unhealthy naming a lost process",
            responses={503: {"description": "a process of the server's group is lost"}})
def health(rt: RuntimeDep) -> Any:
    """``ok``, or ``degraded`` with a reason while named states cannot be written to disk.

    The leader of a group of processes (``server/cluster.py``) adds ``processes`` (each
    one's index, devices, health and heartbeat age) and ``states`` (which of its own
    devices hold each resident state), and answers 503 ``unhealthy`` with the reason while
    a follower is lost or the group is still forming."""
    problem = rt.persistence.problem()
    body: dict[str, Any] = {"status": "ok"} if problem is None else \
        {"status": "degraded", "reason": problem}
    group = rt.group
    if group is None:
        return body
    from statehost.server.placement import resident_shards

    body.update(role="leader", process_index=0, process_count=group.count,
                ops=group.sent, processes=group.processes(),
                kept_arrays=sum(len(s.handles) for s in rt.sessions.all()),
                states=resident_shards(rt.store))
    lost = group.problem()
    if lost is None:
        return body
    return JSONResponse({**body, "status": "unhealthy", "reason": lost}, status_code=503)
