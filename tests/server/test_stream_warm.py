"""The warm path of a call: what it works out once per signature stays exact."""

import jax
import jax.numpy as jnp
import numpy as np

from statehost.server.execution import _describe
from statehost.wire import outputs_signature


def test_output_descriptions_are_remembered_per_abstract_value_and_stay_exact():
    strong = jnp.ones((2, 3), jnp.float32)
    weak = jnp.asarray(1.0) * 2.0  # a Python scalar's weak type survives
    assert jax.typeof(weak).weak_type and not jax.typeof(strong).weak_type
    for _ in range(2):  # the second round answers from the memo: the same answers
        assert _describe(strong) == ((2, 3), "float32", False)
        assert _describe(weak) == ((), "float32", True)
        assert _describe(jnp.ones((2, 3), jnp.int32)) == ((2, 3), "int32", False)
        assert _describe(jnp.ones((3, 2), jnp.float32)) == ((3, 2), "float32", False)
        assert _describe(np.ones(2)) == "ndarray" and _describe(None) == "NoneType"
    # What a client is told to expect changes with the weak type alone.
    assert outputs_signature([_describe(weak)]) != outputs_signature(
        [_describe(jnp.asarray(1.0, jnp.float32))])
