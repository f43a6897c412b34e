"""A loop (a job) is admitted by device memory like a call: its step's program is estimated
before the first step runs; one that does not fit waits in the queue as a queued job, runs
once memory frees, or fails with 507 DeviceMemoryError at its timeout with every state
unchanged (on CPU through ``--device-memory``; sizes as in test_admission)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import statehost
from statehost.client import DeviceMemoryError
from tests.server.scheduling import until
from tests.server.test_admission import MiB, N, _grow, _waiting_for_memory


@pytest.fixture
def box(server):
    """As test_admission's: an 8 MiB device 0, A keeps 6 MiB resident, B has 1 MiB ``w``."""
    s = server(device_memory=8 * MiB, workers=2, session_workers=2)
    a, b = s.connect(), s.connect()
    a.push(statehost.ParamState(jnp.zeros(6 * N, jnp.float32)))
    w = statehost.ParamState(jnp.zeros(N, jnp.float32))
    b.push(w)
    yield s, a, b, w
    a.close()
    b.close()


@pytest.fixture(autouse=True)
def _no_progress_bar(monkeypatch):
    monkeypatch.setenv("STATEHOST_PROGRESS", "0")


def test_a_loop_whose_step_does_not_fit_fails_with_507_at_its_timeout(box):
    s, a, b, w = box
    step = b.jit(_grow(w))
    with pytest.raises(DeviceMemoryError, match=(
            r"not started within its 0.3 s deadline: its program needs an estimated "
            r"4\.0 MiB on device 0 .* and [\d.]+ \S+ of the device's 8\.0 MiB were free")) \
            as caught:
        b.loop(step, 5, timeout=0.3)
    assert caught.value.status == 507
    assert "was never started, so nothing was applied" in str(caught.value)
    b.pull(w)  # no step ran
    np.testing.assert_array_equal(np.asarray(w.value), np.zeros(N, np.float32))
    assert float(b.jit(lambda x: x * 2)(np.float32(3))) == 6.0  # the server serves


def test_a_loop_that_does_not_fit_waits_queued_and_runs_once_memory_frees(box):
    s, a, b, w = box
    job = b.loop(b.jit(_grow(w)), 3, wait=False)
    until(lambda: _waiting_for_memory(s))  # back in the queue, holding no worker
    assert (s.scheduler.running, s.scheduler.queued) == (0, 1)
    job.refresh()
    assert job.status == "queued"  # waiting for memory is not running
    a.close()  # frees A's 6 MiB: the loop fits now
    assert float(np.asarray(job.result()).reshape(-1)[0]) == 3.0
    b.pull(w)
    assert float(np.asarray(w.value)[0]) == 3.0


def test_a_loop_larger_than_the_device_fails_at_once_with_nothing_run(server):
    s = server(device_memory=2 * MiB)
    with s.connect() as client:
        w = statehost.ParamState(jnp.zeros(N, jnp.float32))
        client.push(w)
        with pytest.raises(DeviceMemoryError, match=r"more than the device's 2\.0 MiB .* it "
                           r"can never run there, and was not started") as caught:
            client.loop(client.jit(_grow(w)), 4)
        assert "no step committed, every state is unchanged" in str(caught.value)
        client.pull(w)
        np.testing.assert_array_equal(np.asarray(w.value), np.zeros(N, np.float32))
