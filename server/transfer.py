"""Moving state values without running code: push (upload) and pull (download).

A push goes through the same :class:`~statehost.server.staging.Transaction` as a
call (ownership, version checks, ``sync`` durability, all or nothing); a pull
reads committed values under the states' locks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from statehost.server.execution import to_host
from statehost.server.staging import Transaction
from statehost.wire import (
    FetchReply,
    FetchRequest,
    PullReply,
    PullRequest,
    PushReply,
    PushRequest,
    pack,
)

if TYPE_CHECKING:
    from statehost.server.calls import Call
    from statehost.server.quotas import Charge
    from statehost.server.runtime import Runtime

__all__ = ["fetch_kept", "pull_states", "push_states"]


def push_states(call: Call, request: PushRequest, rt: Runtime,
                where: str = "POST /v1/states/push", *, charge: Charge | None = None
                ) -> PushReply:
    """Stores uploaded values: all of them, or none (``charge``: see ``quotas.Charge``)."""
    assert call.session is not None
    tx = Transaction(rt, call.session, where, charge=charge)
    try:
        ids = tx.stage(request.states, request.uploads)
        if call.kind == "push":  # checked and staged; a put shares itself (named.py)
            rt.share(call, request, where)
        done = tx.commit()
    except BaseException:
        tx.rollback()
        raise
    return PushReply(stored=tuple(ids), state_versions={i: done.versions[i] for i in ids})


def pull_states(call: Call, request: PullRequest, rt: Runtime) -> PullReply:
    """The current values of ``request.ids`` (404 naming any this session cannot see)."""
    assert call.session is not None
    where = "POST /v1/states/pull"
    tx = Transaction(rt, call.session, where)
    states = tx.require(request.ids)
    rt.share(call, request, where)
    values = to_host([(s.id, s.value) for s in states], where)
    versions = {s.id: rt.store.meta(s.id).version for s in states}
    return PullReply(state_versions=versions, states=pack(values, refs=False, code=False))


def fetch_kept(call: Call, request: FetchRequest, rt: Runtime, where: str) -> FetchReply:
    """The host copies of arrays kept in ``call.session`` (the call stream's fetch)."""
    import jax

    assert call.session is not None
    arrays = [call.session.kept(name, where) for name in request.handles]
    rt.share(call, request, where)
    weak = tuple(isinstance(a, jax.Array) and jax.typeof(a).weak_type for a in arrays)
    values = to_host(arrays, where)
    return FetchReply(call_id=request.call_id, weak_types=weak,
                      values=pack(values, refs=False, code=False))
