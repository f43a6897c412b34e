"""Test set-up: 8 virtual CPU devices before JAX starts, strict promotion, clean env.

The tests run as on a host without user configuration, so that none reads or writes the
user's own files and parallel workers (``pytest -n 2``) do not share any:

- no ``$XDG_RUNTIME_DIR``: a server's default Unix socket (``--unix auto``) would be the
  same path for every server of every worker, and a client that switched to it could
  reach another test's server; the tests of the socket name their own directory;
- a ``$XDG_CONFIG_HOME`` of this process's own: no test finds the user's token in
  ``~/.config/statehost`` or writes one there;
- Ctrl-C delivered: a shell starts a background job (``make test &``, ``nohup``) with
  SIGINT ignored, which every process it starts inherits, and then neither
  ``_thread.interrupt_main`` nor a SIGINT sent to a client process interrupts anything
  (the tests of Ctrl-C fail after their timeouts).
"""

import atexit
import os
import shutil
import signal
import tempfile

import jax

os.environ.pop("XDG_RUNTIME_DIR", None)
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="statehost-tests-config-")
atexit.register(shutil.rmtree, os.environ["XDG_CONFIG_HOME"], ignore_errors=True)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Must run before any JAX backend is initialised, so pmap has 8 devices anywhere.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import pytest  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files marked ``long(seconds=...)`` first, longest first; each file's tests in
    their order.

    ``make test`` hands whole files to two workers in collection order (the Makefile's
    ``--no-loadscope-reorder``); a file of minutes that starts last keeps one worker busy
    alone at the end (the suite took 16 min, one worker idle for its last 4). Longest
    first keeps both busy to the end.
    """
    def seconds(item: pytest.Item) -> float:
        mark = item.get_closest_marker("long")
        return mark.kwargs["seconds"] if mark is not None else 0.0

    items.sort(key=seconds, reverse=True)


@pytest.fixture(autouse=True)
def _clean_statehost_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No STATEHOST_* variable from the caller's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("STATEHOST_"):
            monkeypatch.delenv(key)
