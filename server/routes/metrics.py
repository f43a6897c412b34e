"""``GET /metrics``: Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from statehost.server.deps import RuntimeDep, require_token

router = APIRouter(tags=["metrics"], dependencies=[Depends(require_token)])


@router.get("/metrics", response_class=Response,
            summary="Prometheus metrics, text format (needs a token, as every route but health)",
            responses={200: {"content": {"text/plain": {}}}})
def metrics(rt: RuntimeDep) -> Response:
    rt.refresh_gauges()
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)
