"""What the scheduler tests share: a gate that holds workers, waiting helpers, a scheduler
factory, and an in-process server with its own settings (test_scheduler_limits,
test_fairness, test_admission).

The stuck workload is real: a jitted function whose host callback
(``jax.pure_callback``) waits on a ``threading.Event``, so it holds its worker until the
test lets it go, as a callback that sleeps or an endless ``while_loop`` would.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.server import Settings, create_app
from statehost.server.auth import Principal
from statehost.server.calls import Call
from statehost.server.metrics import Metrics
from statehost.server.persistence import Database
from statehost.server.scheduler import Scheduler
from statehost.server.store import SessionTable
from statehost.server.testing import InProcessTransport
from statehost.wire import CONTENT_TYPE, CallRequest, pack
from tests.serving import metric_value

__all__ = ["GATE", "TOKEN", "URL", "Server", "blocked", "gate", "metrics_text", "schedulers",
           "server", "sessions", "stuck_work", "quick_work", "tenant", "until", "until_async"]

TOKEN = "limits-token"
URL = "http://statehost.test"

# The host callback's gate: module level, so the function the client pickles (by
# reference: this module is importable) finds the same Event on the in-process server.
GATE = threading.Event()


@pytest.fixture
def gate():
    GATE.clear()
    yield GATE
    GATE.set()  # never leave a worker blocked, whatever the test did


def _wait_at_gate(x: np.ndarray) -> np.ndarray:
    if x > 0:  # x == 0 passes: the first (synchronous) call caches the function
        GATE.wait(60)
    return x


def blocked(x):
    """A jitted workload that holds its worker until ``GATE`` is set (for x > 0)."""
    return jax.pure_callback(_wait_at_gate, jax.ShapeDtypeStruct((), jnp.float32), x) + 1


_blocked = jax.jit(blocked)


def stuck_work(call: Call) -> float:
    return float(_blocked(jnp.float32(1)))


def quick_work(call: Call) -> float:
    return float(jax.jit(lambda x: x * 2)(jnp.float32(2)))


def until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


async def until_async(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


@pytest.fixture
def sessions():
    table = SessionTable(3600)
    return table.create, table


@pytest.fixture
def schedulers():
    """``make(workers, **options)``: a ``Scheduler``, shut down at the test's end (after the
    gate opens, so no worker stays blocked)."""
    made: list[Scheduler] = []

    def make(workers: int, **options) -> Scheduler:
        made.append(Scheduler(workers, **options))
        return made[-1]

    yield make
    GATE.set()
    for scheduler in made:
        scheduler.shutdown()


def tenant(table: SessionTable, namespace: str | None):
    """A session of a principal of ``namespace`` (``None``: an operator token's)."""
    return table.create(Principal(namespace, "submit" if namespace else "admin",
                                  f"{namespace} token"))


def metrics_text(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


# -- through the app: a real client, /v1/info, /metrics, the cancel route ----------------------
class Server:
    """An in-process app with its own settings, and raw calls of one session."""

    def __init__(self, tmp_path, **settings):
        self.app = create_app(Settings(tokens=(TOKEN,), data_dir=tmp_path / "data",
                                       **settings))
        self.transport = InProcessTransport(self.app)
        self.scheduler = self.app.state.runtime.scheduler
        self.http = httpx.Client(base_url=URL, transport=self.transport,
                                 headers={"authorization": f"Bearer {TOKEN}"})

    def connect(self, token: str = TOKEN):
        return statehost.connect(URL, token=token, transport=self.transport)

    def token(self, namespace: str, scope: str) -> str:
        runtime = self.app.state.runtime
        db = Database(runtime.settings.data_dir / "statehost.db")
        try:
            token = db.create_token(namespace, scope)
        finally:
            db.close()
        runtime.tokens.reload()
        return token

    def stuck_calls(self, client, step, count: int, token: str = TOKEN
                    ) -> list[tuple[str, threading.Thread, list]]:
        """``count`` calls of ``step`` at the gate, sent at once by ``client``'s session
        (``token``: the client's).

        They name no random stream: the client's own calls lock its stream's state, so they
        run one at a time anyway, while these run side by side as far as the server lets
        them (as calls on disjoint states do)."""
        packed = step.placement.packed(step)
        sent = []
        for i in range(count):
            message = CallRequest(session=client._session, call_id=f"stuck-{i}",
                                  digest=packed.digest, function=packed.section,
                                  args=pack(((np.float32(1.0),), {})))
            answer: list = []

            def post(message=message, answer=answer):
                with httpx.Client(base_url=URL, transport=self.transport, timeout=60) as http:
                    answer.append(http.post("/v1/call", content=message.to_frame().to_bytes(),
                                            headers={"content-type": CONTENT_TYPE,
                                                     "authorization": f"Bearer {token}"}))

            thread = threading.Thread(target=post)
            thread.start()
            sent.append((message.call_id, thread, answer))
        return sent

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.http.get("/metrics").text, name, **labels)

    def close(self) -> None:
        self.http.close()
        self.transport.shutdown()


@pytest.fixture
def server(tmp_path):
    made: list[Server] = []

    def make(**settings) -> Server:
        made.append(Server(tmp_path / str(len(made)), **settings))
        return made[-1]

    yield make
    GATE.set()
    for s in made:
        s.close()


