"""Random streams held in states: ``RandomState``, the default stream and draws."""

from statehost.random._rand import (
    DEFAULT,
    RandomState,
    bernoulli,
    choice,
    normal,
    permutation,
    randint,
    seed,
    split_key,
    uniform,
)

__all__ = [
    "DEFAULT",
    "RandomState",
    "bernoulli",
    "choice",
    "normal",
    "permutation",
    "randint",
    "seed",
    "split_key",
    "uniform",
]
