"""Transform scenarios run both in one process and in each process of a jax.distributed group.

``python -m tests.core.multiprocess_scenarios ADDRESS COUNT INDEX OUT`` joins a group of
``COUNT`` processes (4 CPU devices each, gloo collectives) as process ``INDEX`` and writes
the scenarios' results, gathered over the group, to ``OUT`` (``.npz``). The test imports
the same functions and runs them in its own single process on 8 devices: both must agree.

Each scenario takes ``lanes``, the slice of the 8 global lanes this process holds (all of
them in one process), as a multi-controller JAX program does: every process passes its
host-local lanes to ``pmap``, and collectives span the whole group.
"""

import sys

import numpy as np

LANES = 8
DELTA = np.arange(LANES * 4, dtype=np.float32).reshape(LANES, 4)


def affine_pmap(lanes: slice) -> dict[str, np.ndarray]:
    """The seed's Affine under pmap, plus a psum across every lane of the group."""
    import jax

    import statehost
    from statehost.transform import pmap
    from tests.core.models import PARAM, Affine

    model = Affine(lanes.stop - lanes.start)

    def step(delta):
        out = model(delta + jax.lax.psum(delta, "i"))
        return out.sum(axis=-1)

    mapped = pmap(step, axis_name="i", in_axes=0, out_axes=0, state_in_axes={0: PARAM},
                  state_out_axes={0: PARAM})
    for _ in range(3):
        out = mapped(DELTA[lanes])
    assert isinstance(model.weight, statehost.ParamState)
    return {"weight": _gathered(model.weight.value), "out": _gathered(out)}


def replicated_jit_and_vmap(lanes: slice) -> dict[str, np.ndarray]:
    """States every process holds whole: jit and vmap compute the same value everywhere."""
    import jax.numpy as jnp

    import statehost
    from statehost.transform import jit, vmap

    count = statehost.State(jnp.zeros(()))

    def bump(x):
        count.value = count.value + x.sum()
        return count.value

    bumped = jit(bump)
    firsts = [bumped(jnp.ones(3)) for _ in range(2)]
    scale = statehost.ParamState(jnp.arange(4.0))
    scaled = vmap(lambda row: row * scale.value, in_axes=0)(jnp.asarray(DELTA))
    return {"count": np.asarray(count.value), "firsts": np.asarray(firsts),
            "scaled": np.asarray(scaled)}


def global_states(lanes: slice) -> dict[str, np.ndarray]:
    """States kept as global arrays over every device of the group, as a server keeps them:
    pmap maps all 8 lanes and leaves them global, and jit reads them whole."""
    import jax
    import jax.numpy as jnp

    from statehost.transform import jit, pmap
    from tests.core.models import PARAM, Affine

    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.asarray(jax.devices()), ("lanes",)),
        jax.sharding.PartitionSpec("lanes"))

    def spread(value):
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    model = Affine(LANES)
    model.weight.value = spread(np.ones((LANES, 4), np.float32))
    mapped = pmap(lambda d: model(d + jax.lax.psum(d, "i")).sum(axis=-1), axis_name="i",
                  in_axes=0, out_axes=0, state_in_axes={0: PARAM}, state_out_axes={0: PARAM})
    for _ in range(3):
        out = mapped(spread(DELTA))
    assert model.weight.value.shape == (LANES, 4), model.weight.value.shape
    total = jit(lambda: jnp.sum(model.weight.value) * 1)()
    return {"weight": _gathered(model.weight.value), "out": _gathered(out),
            "total": _gathered(total)}


def global_mixed_axes(lanes: slice) -> dict[str, np.ndarray]:
    """Global arrays through a pmap of every kind of axis: a dict argument mapped on axis
    0 beside a replicated one (``in_axes=None``), an output mapped on axis 1 and one not
    mapped (``out_axes=None``), a state mapped on its axis 0. In a group, no call after
    the first compiles (the state keeps its layout; one process's ``jax.pmap`` compiles
    the second call again, for the layout the first gave the state)."""
    import jax

    from statehost.transform import pmap
    from tests.core.models import PARAM, Affine

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("lanes",))

    def put(value, spec):
        sharding = jax.sharding.NamedSharding(mesh, spec)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    model = Affine(LANES)
    model.weight.value = put(np.ones((LANES, 4), np.float32), jax.sharding.PartitionSpec("lanes"))

    def step(batch, scale):
        out = model(batch["x"] * scale)
        return {"row": out.sum(axis=-1), "total": jax.lax.psum(out.sum(), "i")}, out * 2

    mapped = pmap(step, axis_name="i", in_axes=({"x": 0}, None),
                  out_axes=({"row": 0, "total": None}, 1), state_in_axes={0: PARAM},
                  state_out_axes={0: PARAM})
    batch = {"x": put(DELTA, jax.sharding.PartitionSpec("lanes"))}
    scale = put(np.asarray(0.5, np.float32), jax.sharding.PartitionSpec())
    compiles: list[str] = []
    counting = [False]
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _, **kw: compiles.append(event) if counting[0]
        and event == "/jax/core/compile/backend_compile_duration" else None)
    mapped(batch, scale)  # the first call compiles
    counting[0] = True
    for _ in range(2):
        named, doubled = mapped(batch, scale)
    counting[0] = False
    group = jax.process_count() > 1
    assert not group or not compiles, f"later calls compiled {len(compiles)} program(s)"
    assert not group or not any(x.is_fully_addressable for x in jax.tree_util.tree_leaves(
        (named, doubled, model.weight.value))), "an output is not a global array"
    return {"weight": _gathered(model.weight.value), "row": _gathered(named["row"]),
            "total": _gathered(named["total"]), "doubled": _gathered(doubled)}


SCENARIOS = {"affine_pmap": affine_pmap, "global_mixed_axes": global_mixed_axes,
             "global_states": global_states, "replicated_jit_and_vmap": replicated_jit_and_vmap}


def _gathered(value):
    """The whole value over the group's lanes (this process's own when it is alone)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1 or not value.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(value, tiled=True)
                          if jax.process_count() > 1 else value)
    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


def _main(address: str, count: int, index: int, out: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", LANES // count)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes=count, process_id=index)
    per = LANES // count
    lanes = slice(index * per, (index + 1) * per)
    results = {f"{name}.{key}": value for name, scenario in SCENARIOS.items()
               for key, value in scenario(lanes).items()}
    np.savez(out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
