"""Random streams held in states: ``RandomState``, the default stream and draws."""

from statehost.random._rand import (
    DEFAULT,
    RandomState,
    bernoulli,
    choice,
    default_stream,
    normal,
    permutation,
    randint,
    seed,
    split_key,
    uniform,
    use_default_stream,
)

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
