"""Small modules and constants shared by the transform tests."""

import jax.numpy as jnp

import statehost
from statehost.transform import pmap, vmap
from statehost.util.filter import OfType

PARAM = OfType(statehost.ParamState)
MAPPINGS = [pmap, vmap]


class Affine(statehost.nn.Module):
    """The seed notebook's module: ``weight`` (lanes, width) plus a per-lane delta."""

    def __init__(self, lanes, width=4):
        super().__init__()
        self.weight = statehost.ParamState(jnp.ones((lanes, width)))

    def __call__(self, delta):
        self.weight.value = self.weight.value + delta
        return self.weight.value
