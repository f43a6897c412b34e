"""``GET /v1/info``: versions, devices and limits, which the client checks at connect."""

from __future__ import annotations

from typing import Any

import jax
from fastapi import APIRouter, Depends

from statehost.server.deps import SettingsDep, VersionsDep, require_token

router = APIRouter(prefix="/v1", tags=["info"], dependencies=[Depends(require_token)])


def _memory(device: Any) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices and some plugins have no memory stats
        return None
    return None if not stats else stats.get("bytes_limit")


@router.get("/info", summary="Versions, devices and limits (the client checks them at connect)")
def info(settings: SettingsDep, versions: VersionsDep) -> dict[str, Any]:
    return {
        "versions": versions,
        "devices": [
            {"id": d.id, "platform": d.platform, "kind": d.device_kind, "memory": _memory(d)}
            for d in jax.devices()
        ],
        "limits": {"max_body": settings.max_body, "session_ttl": settings.session_ttl},
    }
