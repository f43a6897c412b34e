"""Test set-up: 8 virtual CPU devices before JAX starts, strict promotion, clean env."""

import os

import jax

# Must run before any JAX backend is initialised, so pmap has 8 devices anywhere.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_statehost_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No STATEHOST_* variable from the caller's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("STATEHOST_"):
            monkeypatch.delenv(key)
