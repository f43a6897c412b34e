"""``DispatchWindow``: the worker that dispatches one program too many waits for the oldest."""

import jax
import jax.numpy as jnp
import pytest

from statehost.server.dispatch_window import DispatchWindow, program_marker
from statehost.server.settings import Settings


@jax.jit
def _slow(a):
    """A fraction of a second of matrix products on CPU: still running when its dispatch returns
    (JAX dispatches asynchronously)."""
    for _ in range(8):
        a = jnp.tanh(a @ a)
    return a.sum()


def test_the_program_past_the_window_returns_only_once_the_oldest_has_run():
    window = DispatchWindow(2)
    a = jnp.full((1000, 1000), 1e-3, jnp.float32)
    _slow(a).block_until_ready()  # compiled
    oldest = _slow(a)
    assert not oldest.is_ready()  # else this machine is too fast for the test to mean much
    window.dispatched(oldest)
    window.dispatched(jnp.ones(3) * 2)  # two outstanding: nothing waits
    window.dispatched(jnp.ones(3) + 1)  # three: waits for the oldest
    assert oldest.is_ready()
    assert len(window) == 2


def test_a_deleted_oldest_array_is_not_the_waiting_callers_error():
    window = DispatchWindow(1)
    gone = jnp.arange(3.0) + 1
    gone.delete()
    window.dispatched(gone)
    window.dispatched(jnp.ones(2))  # waits for the deleted one: no error, nothing to wait on


def test_program_marker_finds_an_array_among_outputs_and_state_values():
    a, b = jnp.ones(2), jnp.zeros(3)
    assert program_marker(a, [b]) is a
    assert program_marker({"loss": 1.0}, [b]) is b
    assert program_marker((None, [a]), []) is a
    assert program_marker(3.0, []) is None


def test_the_window_is_a_setting_and_must_hold_a_program():
    assert Settings(dispatch_window=8).dispatch_window == 8
    assert Settings.from_env({"STATEHOST_DISPATCH_WINDOW": "3"}).dispatch_window == 3
    with pytest.raises(ValueError, match="dispatch_window=0 must be >= 1"):
        Settings(dispatch_window=0)
    with pytest.raises(ValueError, match="at least one program"):
        DispatchWindow(0)


def test_finished_programs_are_let_go_so_the_window_keeps_no_buffer_alive():
    window = DispatchWindow(8)
    first = jnp.ones(4) + 1
    first.block_until_ready()
    window.dispatched(first)
    second = jnp.ones(4) * 3
    second.block_until_ready()
    window.dispatched(second)  # the first had run: only the second is still held
    assert len(window) == 1
    window.dispatched(None)  # a step that computed no array: nothing recorded
    assert len(window) == 0
