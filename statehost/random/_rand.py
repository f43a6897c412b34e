"""``RandomState``: a ``State`` holding a PRNG key, and draws from it.

Every draw splits the key and stores one half back, so successive draws differ
and re-seeding reproduces them. Inside ``pmap`` / ``vmap`` the transforms give
each lane its own key and advance the stream once per call.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from statehost._state import State

__all__ = [
    "DEFAULT",
    "RandomState",
    "bernoulli",
    "choice",
    "default_stream",
    "normal",
    "permutation",
    "randint",
    "seed",
    "split_key",
    "uniform",
    "use_default_stream",
]

Shape = int | Sequence[int] | None


def _to_key(seed_or_key: Any) -> jax.Array:
    if seed_or_key is None:
        seed_or_key = int(np.random.SeedSequence().generate_state(1)[0])
    if isinstance(seed_or_key, int | np.integer) and 0 <= int(seed_or_key) < 2**32:
        # The raw threefry key of jax.random.PRNGKey(seed), built with numpy so that
        # importing statehost (which makes DEFAULT) does not initialise a JAX backend
        # before the user had a chance to call jax.config.update(...).
        s = int(seed_or_key)
        return np.array([s >> 32, s & 0xFFFFFFFF], dtype=np.uint32)
    if isinstance(seed_or_key, int | np.integer):
        return jax.random.PRNGKey(int(seed_or_key))
    key = seed_or_key if isinstance(seed_or_key, jax.Array) else np.asarray(seed_or_key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.shape != (2,) or key.dtype != np.uint32:
        raise ValueError(
            f"RandomState(seed_or_key=...): expected an int seed or a key from "
            f"jax.random.PRNGKey / jax.random.key, got an array of shape {key.shape} and "
            f"dtype {key.dtype}. Fix: pass an int, e.g. RandomState(0)."
        )
    return key


def _shape(size: Shape, *params: Any) -> tuple[int, ...]:
    if size is None:
        return jnp.broadcast_shapes(*(jnp.shape(p) for p in params)) if params else ()
    return (size,) if isinstance(size, int) else tuple(size)


class RandomState(State):
    """A ``State`` whose value is a PRNG key; every draw advances it.

    Arguments:
        seed_or_key: an int seed, a key array, or ``None`` for a fresh random seed.

    Example:
        >>> rs = RandomState(0)
        >>> a = rs.normal(size=3); rs.seed(0); b = rs.normal(size=3)
        >>> bool((a == b).all())
        True
    """

    __module__ = "statehost.random"
    __slots__ = ()

    def __init__(self, seed_or_key: Any = None, *, name: str | None = None):
        super().__init__(_to_key(seed_or_key), name=name)

    def seed(self, seed_or_key: Any = None) -> None:
        """Resets the stream to ``seed_or_key``."""
        self.value = _to_key(seed_or_key)

    def split_key(self, n: int | None = None) -> jax.Array:
        """Advances the stream and returns one fresh key, or ``n`` keys stacked."""
        keys = jax.random.split(self.value, 2 if n is None else n + 1)
        self.value = keys[0]
        return keys[1] if n is None else keys[1:]

    def normal(self, loc: Any = 0.0, scale: Any = 1.0, size: Shape = None, dtype: Any = None):
        """Gaussian draws with mean ``loc`` and standard deviation ``scale``."""
        shape = _shape(size, loc, scale)
        z = jax.random.normal(self.split_key(), shape, dtype or jnp.float32)
        return z * scale + loc

    def uniform(self, low: Any = 0.0, high: Any = 1.0, size: Shape = None, dtype: Any = None):
        """Uniform draws on ``[low, high)``."""
        shape = _shape(size, low, high)
        u = jax.random.uniform(self.split_key(), shape, dtype or jnp.float32)
        return u * (high - low) + low

    def randint(self, low: Any, high: Any = None, size: Shape = None, dtype: Any = jnp.int32):
        """Integers on ``[low, high)`` (``[0, low)`` when ``high`` is omitted)."""
        if high is None:
            low, high = 0, low
        shape = _shape(size, low, high)
        return jax.random.randint(self.split_key(), shape, low, high, dtype)

    def bernoulli(self, p: Any = 0.5, size: Shape = None):
        """Booleans that are ``True`` with probability ``p``."""
        return jax.random.bernoulli(self.split_key(), p, _shape(size, p))

    def permutation(self, x: Any, axis: int = 0):
        """A shuffled copy of ``x`` (or of ``arange(x)`` for an int)."""
        return jax.random.permutation(self.split_key(), x, axis=axis)

    def choice(self, a: Any, size: Shape = None, replace: bool = True, p: Any = None):
        """Samples from ``a`` (or ``arange(a)`` for an int)."""
        shape = () if size is None else _shape(size)
        return jax.random.choice(self.split_key(), a, shape, replace=replace, p=p)


# The default stream that module-level draws use (the seed's API requires it).
DEFAULT = RandomState(None, name="statehost.random.DEFAULT")

# A stand-in for DEFAULT in the current context: the server runs each client's calls
# with that client's own default stream, so module-level draws there match the
# client's local ones. A ContextVar keeps worker threads apart.
_OVERRIDE: contextvars.ContextVar[RandomState | None] = contextvars.ContextVar(
    "statehost_default_stream", default=None
)


def default_stream() -> RandomState:
    """The stream module-level draws use here: ``DEFAULT`` unless overridden."""
    override = _OVERRIDE.get()
    return DEFAULT if override is None else override


@contextlib.contextmanager
def use_default_stream(state: RandomState) -> Iterator[RandomState]:
    """Makes ``state`` the default stream inside the ``with`` block (this context only).

    Arguments:
        state: the ``RandomState`` that ``statehost.random.normal`` & co. draw from.

    Example:
        >>> import statehost
        >>> mine = statehost.random.RandomState(0)
        >>> with statehost.random.use_default_stream(mine):
        ...     _ = statehost.random.normal()
        >>> mine.write_count
        1
    """
    if not isinstance(state, RandomState):
        raise TypeError(
            f"statehost.random.use_default_stream(state=...): expected a RandomState, got "
            f"{type(state).__name__}. Fix: pass statehost.random.RandomState(seed)."
        )
    token = _OVERRIDE.set(state)
    try:
        yield state
    finally:
        _OVERRIDE.reset(token)


def seed(seed_or_key: Any = None) -> None:
    """Re-seeds the default stream."""
    default_stream().seed(seed_or_key)


def split_key(n: int | None = None) -> jax.Array:
    """Advances the default stream; returns one key, or ``n`` keys stacked."""
    return default_stream().split_key(n)


def normal(loc: Any = 0.0, scale: Any = 1.0, size: Shape = None, dtype: Any = None):
    """Gaussian draws from the default stream."""
    return default_stream().normal(loc, scale, size, dtype)


def uniform(low: Any = 0.0, high: Any = 1.0, size: Shape = None, dtype: Any = None):
    """Uniform draws from the default stream."""
    return default_stream().uniform(low, high, size, dtype)


def randint(low: Any, high: Any = None, size: Shape = None, dtype: Any = jnp.int32):
    """Integer draws from the default stream."""
    return default_stream().randint(low, high, size, dtype)


def bernoulli(p: Any = 0.5, size: Shape = None):
    """Boolean draws from the default stream."""
    return default_stream().bernoulli(p, size)


def permutation(x: Any, axis: int = 0):
    """A shuffled copy of ``x`` from the default stream."""
    return default_stream().permutation(x, axis)


def choice(a: Any, size: Shape = None, replace: bool = True, p: Any = None):
    """Samples from ``a`` with the default stream."""
    return default_stream().choice(a, size, replace, p)
