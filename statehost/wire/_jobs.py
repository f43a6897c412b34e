"""The message of a server-side loop (``POST /v1/jobs``): a call run ``steps`` times.

``LoopRequest`` is a :class:`~statehost.wire.CallRequest` with three more header
fields, and its ``args`` section holds ``(args, kwargs, over)``: ``over`` is a pytree
of arrays whose leading axis (of length ``steps``) is sliced per step, the slice
passed after ``args``, as ``jax.lax.scan`` passes ``xs``. The job's result is a
``CallReply``. It reuses the header rules of ``_messages``
(the timeout, seconds or null, is ``CallRequest``'s own field).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from statehost.wire._messages import CallRequest, Seconds

__all__ = ["KEEP", "LoopRequest"]

#: What a loop keeps of its steps' outputs: the last step's, or all of them, stacked.
KEEP = ("last", "all")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopRequest(CallRequest):
    """Run a shipped transform ``steps`` times on the server, each step committed.

    Every field of ``CallRequest`` means what it means there (uploads are staged with
    the first step), plus: ``steps`` (>= 1), ``keep`` (``"last"``: the outputs are the
    last step's; ``"all"``: every step's, stacked on a new leading axis) and ``timeout``
    (seconds from submission after which the loop stops between steps; null: none).
    """

    kind: ClassVar[str] = "loop"
    steps: int
    keep: str = "last"
    timeout: Seconds = None
