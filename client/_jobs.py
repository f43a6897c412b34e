"""Jobs and server-side loops on the client: ``client.loop``, ``client.submit``, ``client.job``.

A loop ships the mapping once and the server runs it ``steps`` times, each step
committed (``POST /v1/jobs``). The client follows the job's progress from the
Server-Sent Events the server streams (``GET /v1/jobs/{id}/events``), showing a tqdm
bar (``tqdm.auto`` in a notebook with ipywidgets, plain text otherwise;
``progress=False`` or ``STATEHOST_PROGRESS=0`` turn it off), then fetches the
result frame. Ctrl-C while it waits asks the server to stop the loop after its
current step and re-raises ``KeyboardInterrupt`` at once: one press is enough.

A :class:`Job` outlives the process that submitted it: another process with the same
token re-attaches with ``client.job(id)``.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from statehost._errors import WireError
from statehost.client._errors import (
    ClientError,
    JobCancelledError,
    JobNotDoneError,
    ProtocolError,
    RemoteExecutionError,
    SessionNotFoundError,
    StateNotFoundError,
    TransportError,
)
from statehost.client._http import _raise_for, _translate
from statehost.client._outputs import local_outputs
from statehost.client._progress import bar_class
from statehost.client._progress import enabled as progress_enabled
from statehost.client._remote import RemotePlacement
from statehost.transform._stateful import StatefulCall
from statehost.wire import CONTENT_TYPE, KEEP, CallReply, LoopRequest, decode, pack

if TYPE_CHECKING:
    from statehost._state import State
    from statehost.client._client import Client, _StreamTwin

__all__ = ["Job", "attach", "list_jobs", "loop"]

_FINAL = ("completed", "failed", "cancelled")
# Ctrl-C: the cancel request gets this long, so KeyboardInterrupt is re-raised within 1 s.
_CANCEL_TIMEOUT = 0.6
_RESENDS = 2

_MSG_NOT_A_MAPPING = (
    "statehost.Client.{api}: expected a transform (client.pmap / client.vmap / client.jit), "
    "got {got}. Example: step = client.pmap(model, axis_name='i'); "
    "client.loop(step, 100, over=batches)."
)


def _bar(total: int, job_id: str) -> Any:
    """A tqdm bar of ``total`` steps (tqdm shows steps/s and the ETA); ``None`` when tqdm
    is not installed (it comes with ``statehost[client]``)."""
    try:
        cls = bar_class()
    except ImportError:
        return None
    return cls(total=total, unit="step", desc=f"job {job_id[:8]}", dynamic_ncols=True)


@dataclass
class _Context:
    """What the submitting client needs to apply a loop's result to its local states."""

    transform: StatefulCall
    placement: RemotePlacement
    refs: dict[str, State]
    twin: _StreamTwin


class Job:
    """A job on the server: a loop (``client.loop(..., wait=False)``) or one call
    (``client.submit``). It runs on when this process ends; ``client.job(id)`` finds it
    again.

    Attributes:
        id: the job's id (``statehost jobs`` lists them).

    Example:
        >>> job = client.loop(step, 1000, over=batches, wait=False)   # doctest: +SKIP
        >>> job.progress, job.status                                  # doctest: +SKIP
        ((120, 1000), 'running')
        >>> out = job.result()                                        # doctest: +SKIP
    """

    def __init__(self, client: Client, job_id: str, info: dict[str, Any] | None = None,
                 context: _Context | None = None):
        self._client = client
        self.id = job_id
        self._info: dict[str, Any] = info or {}
        self._context = context
        self._outputs: Any = None
        self._has_outputs = False

    # -- looking at it --------------------------------------------------------------
    def refresh(self) -> dict[str, Any]:
        """The job as the server shows it now (``GET /v1/jobs/{id}``)."""
        self._info = self._client._http.json("GET", f"/v1/jobs/{self.id}")
        return self._info

    def _current(self) -> dict[str, Any]:
        return self._info if self._info.get("status") in _FINAL else self.refresh()

    @property
    def status(self) -> str:
        """``"queued"``, ``"running"``, ``"completed"``, ``"failed"`` or ``"cancelled"``."""
        return str(self._current()["status"])

    @property
    def progress(self) -> tuple[int, int]:
        """``(steps done, total steps)``."""
        shown = self._current()["progress"]
        return int(shown["done"]), int(shown["total"])

    def done(self) -> bool:
        """Whether the job has ended (completed, failed or cancelled)."""
        return self.status in _FINAL

    def cancel(self) -> None:
        """Asks the server to stop the job: at once if it is queued, else after the step it
        is running (one device program cannot be interrupted, openxla/xla#16801); the
        states keep the values of the last completed step."""
        self._info = self._client._http.json("POST", f"/v1/jobs/{self.id}/cancel")

    def _repr_html_(self) -> str:
        """The notebook display, as of the job's last answer (no request): status and a
        progress bar of steps done."""
        import html

        from statehost._display import html_table

        info = self._info
        progress = info.get("progress", {})
        done, total = progress.get("done", 0), progress.get("total") or info.get("steps") or 0
        rate, eta = progress.get("steps_per_second"), progress.get("eta_s")
        rows = [("status", str(info.get("status", "unknown"))),
                ("steps", f"{done} / {total or '?'}"),
                ("steps/s", "–" if rate is None else f"{rate:.1f}"),
                ("ETA", "–" if eta is None else f"{eta:.1f} s")]
        bar = (f'<progress value="{int(done)}" max="{max(1, int(total))}"></progress>'
               if total else "")
        return (f"<div><b>statehost Job {html.escape(self.id)}</b> {bar}"
                + html_table(None, rows) + "</div>")

    def __repr__(self) -> str:
        info = self._info
        if not info:
            return f"statehost.Job({self.id!r})"
        shown = info.get("progress", {})
        extra = ", cancel requested" if info.get("cancel_requested") and \
            info.get("status") not in _FINAL else ""
        return (f"statehost.Job({self.id!r}, {info.get('status')}, "
                f"{shown.get('done', 0)}/{shown.get('total', '?')} steps{extra})")

    # -- waiting ----------------------------------------------------------------------
    def _events(self, deadline: float | None) -> Iterator[tuple[str, dict[str, Any]]]:
        """The job's Server-Sent Events until ``end``; raises ``JobNotDoneError`` past
        ``deadline`` (a ``time.monotonic()``)."""
        http = self._client._http
        path = f"/v1/jobs/{self.id}/events"
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise self._not_done()
            read = http.timeout if left is None else max(0.01, min(left, http.timeout))
            try:
                with _translate(f"GET {path}", http.base_url, read), http.client.stream(
                        "GET", path, timeout=httpx.Timeout(http.timeout, read=read)) as response:
                    if response.status_code >= 400:
                        _raise_for(response.status_code, response.read(), f"GET {path}")
                    for name, data in _parse_events(response.iter_lines()):
                        yield name, data
                        if name == "end":
                            return
                        if deadline is not None and time.monotonic() >= deadline:
                            raise self._not_done()
            except TransportError as exc:
                if not isinstance(exc.__cause__, httpx.ReadTimeout | TimeoutError):
                    raise
            # A read timeout: past the deadline that is a JobNotDoneError, else reconnect.

    def _not_done(self) -> JobNotDoneError:
        info = self.refresh()
        shown = info.get("progress", {})
        return JobNotDoneError(
            f"statehost.Job({self.id!r}).result: the job is {info.get('status')} "
            f"({shown.get('done')} of {shown.get('total')} steps) and the timeout passed. "
            "It runs on; call result() again to wait longer, or cancel() it.",
            body={"job_status": info.get("status"), **shown})

    def wait(self, timeout: float | None = None, *, progress: bool = False) -> None:
        """Blocks until the job ends, or raises ``JobNotDoneError`` after ``timeout`` s.

        Arguments:
            timeout: seconds to wait; ``None``: as long as it takes.
            progress: show a progress bar (steps/s and ETA) fed by the server's events.
        """
        if self._info.get("status") in _FINAL:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = None
        try:
            for name, data in self._events(deadline):
                if name == "progress":
                    if bar is None and progress_enabled(progress):
                        bar = _bar(int(data["total"]), self.id)
                        progress = bar is not None
                    if bar is not None:
                        bar.update(int(data["done"]) - bar.n)
                elif name == "end":
                    self._info = data
                    if bar is not None:
                        bar.update(int(data["progress"]["done"]) - bar.n)
        finally:
            if bar is not None:
                bar.close()

    def result(self, timeout: float | None = None, *, progress: bool = False) -> Any:
        """The job's outputs, once it completed (waiting for it).

        The loop's written states come into the local ``State`` objects when the job was
        submitted by this client with ``pull=True``. A failed job raises its error, a
        cancelled one ``JobCancelledError``; both leave the states at the last completed
        step (pulled here too).

        Arguments:
            timeout: seconds to wait; past them ``JobNotDoneError`` (the job runs on).
            progress: show a progress bar while waiting.

        Returns:
            The outputs: the last step's, or every step's stacked (``keep="all"``).
        """
        if self._has_outputs:
            return self._outputs
        self.wait(timeout, progress=progress)
        http = self._client._http
        path = f"/v1/jobs/{self.id}/result"
        with _translate(f"GET {path}", http.base_url, http.timeout):
            response = http.client.get(path)
        if response.status_code >= 400:
            try:
                _raise_for(response.status_code, response.content, f"GET {path}")
            except (RemoteExecutionError, JobCancelledError) as exc:
                self._after_stop(exc.body)
                raise self._localized(exc) from None
            except Exception as exc:
                self._after_stop(getattr(exc, "body", {}))
                raise
        try:
            reply = CallReply.from_frame(decode(response.content))
        except WireError as exc:
            raise ProtocolError(f"GET {path}: the answer is not a CallReply frame "
                                f"({exc}).") from exc
        self._outputs, self._has_outputs = self._apply(reply), True
        return self._outputs

    # -- applying the outcome to this client's states -------------------------------
    def _apply(self, reply: CallReply) -> Any:
        context = self._context
        if context is not None:
            client = self._client
            pulled = client._apply(reply.states.load() if reply.states is not None else None,
                                   reply.state_versions, context.refs)
            client._ledger.written_remotely(set(reply.written) - pulled)
            context.twin.publish(pulled)
        return local_outputs(reply)

    def _after_stop(self, body: dict[str, Any]) -> None:
        """A failed or cancelled loop: its completed steps committed, so the states it
        wrote are newer on the server; pulled here when the mapping pulls."""
        context = self._context
        if context is None:
            return
        written = [i for i in body.get("written", []) if i in context.refs]
        ledger = self._client._ledger
        ledger.written_remotely(written)
        if context.placement.pull and written:
            try:
                self._client.pull([context.refs[i] for i in written])
            except ClientError:  # the job's own error is the one to raise
                return
            context.twin.publish(set(written))

    def _localized(self, exc: Exception) -> Exception:
        if self._context is None or not isinstance(exc, RemoteExecutionError):
            return exc
        from statehost.client._client import _localized

        return _localized(exc, self._context.transform)

    def _interrupted(self) -> None:
        """Ctrl-C while waiting: ask the server to stop the loop, within ``_CANCEL_TIMEOUT``.

        The states it wrote are marked newer on the server (they are pulled by the next
        call that pulls, or ``client.pull``); nothing waits for more.
        """
        if self._context is not None:
            self._client._ledger.written_remotely(self._context.refs)
        try:
            self._client._http.client.post(f"/v1/jobs/{self.id}/cancel",
                                           timeout=_CANCEL_TIMEOUT)
        except BaseException:  # noqa: S110  the interrupt is what matters now
            pass


def _parse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(event, JSON data)`` from Server-Sent Events lines (comments skipped)."""
    name, data = "message", []
    for line in lines:
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)


# -- what the Client methods do ------------------------------------------------------
def _placement(client: Client, mapping: Any, api: str) -> RemotePlacement:
    if not isinstance(mapping, StatefulCall):
        raise TypeError(_MSG_NOT_A_MAPPING.format(api=api, got=type(mapping).__name__))
    placement = mapping.placement
    if isinstance(placement, RemotePlacement) and placement.client is client:
        return placement
    return RemotePlacement(client)  # a local transform: shipped as client.jit & co would


def _check(steps: Any, keep: Any, timeout: Any, api: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"statehost.Client.{api}: steps={steps!r} must be an int >= 1.")
    if keep not in KEEP:
        raise ValueError(f"statehost.Client.{api}: keep={keep!r} must be one of "
                         f"{', '.join(map(repr, KEEP))}.")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(
            timeout, int | float) or not 0 < timeout <= 1e9):
        raise ValueError(f"statehost.Client.{api}: timeout={timeout!r} must be a number of "
                         "seconds above 0 (at most 1e9), or None (no limit).")


def _post(client: Client, message: LoopRequest) -> dict[str, Any]:
    """POSTs the frame; the answer is the job, as JSON."""
    http = client._http
    what = "POST /v1/jobs"
    encoded = message.to_frame()
    headers = {"content-type": CONTENT_TYPE, "content-length": str(encoded.nbytes)}
    http.client  # raises ClientClosedError after close()  # noqa: B018
    chunks = encoded.to_bytes() if encoded.nbytes <= 1 << 20 else encoded.chunks(1 << 20)
    with _translate(what, http.base_url, http.timeout):
        status, body = http.frames.post_frame("/v1/jobs", chunks, encoded.nbytes, headers)
    _raise_for(status, bytes(body[:65536]), what)
    return json.loads(bytes(body))


def loop(client: Client, mapping: Any, steps: int, args: tuple[Any, ...],
         kwargs: dict[str, Any], *, over: Any, keep: str, progress: bool,
         timeout: float | None, wait: bool, api: str = "loop") -> Any:
    """``Client.loop`` / ``Client.submit``: see there."""
    from statehost.client._client import _to_host

    placement = _placement(client, mapping, api)
    _check(steps, keep, timeout, api)
    sync = getattr(client, "sync", None)
    if callable(sync):  # earlier asynchronous calls are applied first
        sync()
    packed = placement.packed(mapping)
    call_args = pack(_to_host((args, kwargs, over)))
    twin = client._stream_twin()
    refs = {s.id: s for s in packed.states}
    refs.update((s.id, s) for s in call_args.states)
    refs[twin.state.id] = twin.state
    call_id = secrets.token_hex(8)
    what = f"statehost.Client.{api}"
    for resend in range(_RESENDS + 1):
        # Values the server lacks go first, as a push: the ledger then knows their versions,
        # whatever becomes of the job.
        uploads = [s for s in refs.values() if client._ledger.needs_upload(s)]
        if uploads:
            client.push(uploads)
        message = LoopRequest(
            session=client._session, call_id=call_id, digest=packed.digest, refs=tuple(refs),
            default_stream=twin.state.id, pull=placement.pull,
            pull_ids=tuple(client._ledger.stale_among(refs)) if placement.pull else (),
            function=packed.section, args=call_args, steps=steps, keep=keep,
            timeout=None if timeout is None else float(timeout))
        try:
            info = _post(client, message)
            break
        except SessionNotFoundError:
            if resend == _RESENDS:
                raise
            client._reopen(refs, what)
        except StateNotFoundError as exc:
            if resend == _RESENDS or not client._forget_missing(exc, refs, what):
                raise
    client._ledger.function_sent(packed.digest)
    client._ledger.track(refs.values())
    job = Job(client, info["id"], info, _Context(mapping, placement, refs, twin))
    if not wait:
        return job
    try:
        return job.result(progress=progress)
    except KeyboardInterrupt:
        job._interrupted()
        raise


def attach(client: Client, job_id: str) -> Job:
    """``Client.job``: the job ``job_id`` of this token (``JobNotFoundError`` if none)."""
    if not isinstance(job_id, str) or not job_id:
        raise TypeError(f"statehost.Client.job: expected a job id (a str, as Job.id and "
                        f"`statehost jobs` show it), got {job_id!r}.")
    job = Job(client, job_id)
    job.refresh()
    return job


def list_jobs(client: Client) -> list[Job]:
    """Every job of this token the server still knows, oldest first."""
    return [Job(client, info["id"], info)
            for info in client._http.json("GET", "/v1/jobs")["jobs"]]
