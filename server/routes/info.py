"""``GET /v1/info``: versions, devices and limits, which the client checks at connect, and
the calls in flight (with the stuck ones: running long, or past their deadline)."""

from __future__ import annotations

from typing import Any

import jax
from fastapi import APIRouter, Depends, Request

from statehost.server.admission import memory_stats
from statehost.server.deps import (
    PrincipalDep,
    RuntimeDep,
    SettingsDep,
    VersionsDep,
    require_token,
)

router = APIRouter(prefix="/v1", tags=["info"], dependencies=[Depends(require_token)])

#: What ``/v1/info`` shows of a stuck call (``Call.describe`` has more).
_STUCK_FIELDS = ("id", "kind", "session", "age_s", "running_s", "cancel_requested")




@router.get("/info", summary="Versions, devices and limits (the client checks them at "
            "connect), and the calls queued, running and stuck")
def info(request: Request, settings: SettingsDep, versions: VersionsDep, rt: RuntimeDep,
         principal: PrincipalDep) -> dict[str, Any]:
    """``ledger`` is the byte ledger: what resident states hold on each device, per
    namespace this token can read (named states and its sessions' anonymous ones) and per
    session of this token (an operator token: every session, by the first 8 characters of
    its id). ``calls.stuck`` lists the calls running longer than ``stuck_after`` seconds or past
    their deadline, oldest first, with their session's first 8 characters. A running
    device program cannot be interrupted (openxla/xla#16801): a stuck call that was
    cancelled, or is past its deadline, shows ``cancel_requested`` until it returns."""
    scheduler = rt.scheduler
    stuck = [{k: call[k] for k in _STUCK_FIELDS}
             for call in (c.describe() for c in scheduler.stuck(settings.stuck_after))]
    group = rt.group
    # A group's other processes' devices answer no memory_stats here (not addressable).
    stats = {d: memory_stats(d) if d.process_index == jax.process_index() else {}
             for d in jax.devices()}
    return {
        "versions": versions,
        "devices": [
            {"id": d.id, "platform": d.platform, "kind": d.device_kind,
             "memory": found.get("bytes_limit"),
             **({"process_index": d.process_index} if group is not None else {})}
            for d, found in stats.items()
        ],
        # A group of processes (server/cluster.py): each one's devices and health.
        **({"processes": group.processes()} if group is not None else {}),
        # Apart from "devices", whose entries older clients read field by field.
        "memory_in_use": {str(d.id): found.get("bytes_in_use") for d, found in stats.items()},
        "limits": {"max_body": settings.max_body, "session_ttl": settings.session_ttl,
                   "workers": settings.workers, "session_workers": settings.session_workers,
                   "call_timeout": settings.call_timeout, "stuck_after": settings.stuck_after,
                   "namespace_weight": settings.namespace_weight,
                   "namespace_weights": dict(settings.namespace_weights),
                   "quota_defaults": rt.quotas.defaults.describe()},
        "calls": {"queued": scheduler.queued, "running": scheduler.running, "stuck": stuck},
        # A client on this host given a loopback URL switches to it (server/unix_socket.py).
        "unix_socket": getattr(request.app.state, "unix_socket", None),
        # Whether large array buffers go by shared memory over it, and why (shared_memory.py).
        "shared_memory": _shared_memory(request.app.state, settings),
        "instance": request.app.state.instance,
        # the fair scheduler's queues (a caller's namespace; see statehost.server.calls)
        "queues": {ns: {**counts, "weight": settings.weight_of(ns)}
                   for ns, counts in sorted(scheduler.by_namespace().items())},
        "admission": {"enabled": scheduler.admission is not None,
                      "device_memory": settings.device_memory,
                      "reserved": {str(dev): n for dev, n in sorted(
                          rt.admission.reserved().items())}},
        "ledger": _ledger(rt, principal),
    }


def _ledger(rt: Any, principal: Any) -> dict[str, Any]:
    ledger = rt.store.ledger
    mine = {s.id: s for s in rt.sessions.all()
            if principal.namespace is None or s.principal == principal}
    return {
        "devices": dict(sorted(ledger.total().by_device.items())),
        "namespaces": {ns: usage.describe() for ns, usage in sorted(ledger.by_namespace().items())
                       if principal.can(ns, "read")},
        "sessions": {sid[:8]: usage.describe() for sid, usage in ledger.by_session().items()
                     if sid in mine},
    }


def _shared_memory(state: Any, settings: Any) -> dict[str, Any]:
    service = getattr(state, "shared_memory", None)
    if service is not None:
        return service.describe()
    return {"enabled": False, "why": "not serving on a Unix socket (statehost serve makes "
            "one)", "threshold": settings.shared_memory_threshold, "socket": None}
