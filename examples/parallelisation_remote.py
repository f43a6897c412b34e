"""The "Parallelisation" notebook (shared/seed/parallelisation.md) run on a server.

The same notebook as ``examples/parallelisation.py``, with every transform sent
to a running ``statehost serve`` through the client: ``pmap(...)`` becomes
``client.pmap(...)``, ``StatefulMapping(...)`` becomes
``client.StatefulMapping(...)``, and the server's devices
(``client.devices()``) size the model and the data. Updated states come back
into the local ``model`` after each call; outputs come back as ``jax.Array``s, as
locally.

The seed's cells are marked ``# In [n]:``; the two cells it lacks (connect, close)
are marked ``# %%``. Run a server (``statehost serve``), then
``python examples/parallelisation_remote.py``.
The URL is ``$STATEHOST_URL`` (default ``http://127.0.0.1:8470``); the token is
``$STATEHOST_TOKEN``, else the one a local ``statehost serve`` wrote.
"""

# In [1]:
import os

import jax
import jax.numpy as jnp

import statehost as brainstate
from statehost.util.filter import OfType

# In [2]:
jax.config.update('jax_num_cpu_devices', 8)
print('local device count:', jax.local_device_count())

# %% Not in the seed: connect to the server.
client = brainstate.connect(os.environ.get('STATEHOST_URL', 'http://127.0.0.1:8470'))
print('server device count:', len(client.devices()))


# In [3]:
class Affine(brainstate.nn.Module):
    def __init__(self, size):
        super().__init__()
        self.weight = brainstate.ParamState(jnp.ones((size,)))

    def __call__(self, delta):
        self.weight.value = self.weight.value + delta
        return self.weight.value


model = Affine(size=len(client.devices()))
axis_name = 'devices'

pmapped_update = client.pmap(
    model,
    axis_name=axis_name,
    in_axes=0,
    out_axes=0,
    state_in_axes={0: OfType(brainstate.ParamState)},
    state_out_axes={0: OfType(brainstate.ParamState)},
)

# Each device receives a different delta vector
per_device_delta = jnp.arange(len(client.devices()) * 4.).reshape(len(client.devices()), 4)
updated = pmapped_update(per_device_delta)
print('updated shape:', updated.shape)
print('final weights:', model.weight.value)

# In [4]:
logical_devices = client.devices()[:2]
model = Affine(size=len(logical_devices))

pairwise_update = client.pmap(
    model,
    axis_name='pair',
    in_axes=0,
    out_axes=0,
    devices=logical_devices,
    state_in_axes={0: OfType(brainstate.ParamState)},
    state_out_axes={0: OfType(brainstate.ParamState)},
)

deltas = jnp.stack([jnp.ones((4,)), -jnp.ones((4,))], axis=0)[:len(logical_devices)]  # a 1-GPU server has one
pairwise_update(deltas)
print('weights after pairwise update:', model.weight.value)


# In [5]:
@client.pmap(axis_name=axis_name, in_axes=(0, None), out_axes=0)
def add_with_scale(delta, scale):
    return delta + scale

print(repr(add_with_scale(jnp.arange(len(client.devices())), 0.5)))

# In [6]:
rand_state = brainstate.random.RandomState(0)

@client.pmap(
    axis_name='devices',
    in_axes=0,
    out_axes=0,
    state_in_axes={0: OfType(brainstate.random.RandomState)},
    state_out_axes={0: OfType(brainstate.random.RandomState)},
)
def sample_normal(scale):
    return brainstate.random.normal(0.0, scale)

per_device_scales = jnp.linspace(1.0, 2.0, len(client.devices()))
print(repr(sample_normal(per_device_scales)))

# In [7]:
shared_key = jax.random.PRNGKey(0)

@client.pmap(axis_name='devices', in_axes=(None, 0), out_axes=0)
def sample_shared(key, scale):
    return jax.random.normal(key, ()) * scale

print(repr(sample_shared(shared_key, per_device_scales)))

# In [8]:
parallel_mapping = client.pmap(
    model,
    axis_name='devices',
    in_axes=0,
    out_axes=0,
    state_in_axes={0: OfType(brainstate.ParamState)},
    state_out_axes={0: OfType(brainstate.ParamState)},
)

print(type(parallel_mapping))
print('origin fun:', parallel_mapping.origin_fun)
print('state_in_axes:', parallel_mapping.state_in_axes)

# In [9]:
model = Affine(size=len(client.devices()))

custom_pmap = client.StatefulMapping(
    model,
    in_axes=0,
    out_axes=0,
    state_in_axes={0: OfType(brainstate.ParamState)},
    state_out_axes={0: OfType(brainstate.ParamState)},
    axis_name='devices',
    mapping_fn=lambda fun, *a, **kw: jax.pmap(fun, donate_argnums=(0,), *a, **kw),
)

custom_pmap(jnp.ones((len(client.devices()), 4)))

print(repr(model.weight.value))

# %% Not in the seed: end the session (the server frees its states).
client.close()
