"""Lets JAX functions take a ``RemoteArray`` directly: ``jnp.sin(x)``, ``jax.jit(f)(x)``.

JAX 0.10 no longer converts an object through ``__jax_array__`` while it abstracts the
arguments of a jitted function (``jax/_src/core.py``, ``shaped_abstractify``: "Triggering
__jax_array__() during abstractification is no longer supported"), and nearly every
``jax.numpy`` function is jitted. Its own suggestion, registering the type as a pytree,
would make ``jax.tree_util`` see a ``RemoteArray`` as a node, not the leaf it is.

So this module registers ``RemoteArray`` the way JAX registers its own array types, in
three tables of ``jax._src`` (checked against jax 0.10.2):

- ``core.pytype_aval_mappings``: its abstract value is known without fetching (shape,
  dtype, weak type), so tracing ``jnp.sin(x)`` moves no bytes;
- ``dtypes.register_canonicalize_value_handler`` and ``pxla.shard_arg_handlers``: when the
  compiled program runs, the value is fetched (once; it is cached) and handed on as the
  ``jax.Array`` it is.

These tables are private. If a JAX release renames them, ``register`` registers nothing
and says why in ``UNSUPPORTED``; ``jnp.asarray(x)`` still works (``__jax_array__``), and
the ``RemoteArray`` docstring tells users to write that.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["UNSUPPORTED", "register"]

UNSUPPORTED: list[str] = []  # why JAX functions cannot take the type directly, if so


def register(cls: type) -> None:
    """Teaches JAX the abstract value of ``cls`` and how to hand its value to a program.

    ``cls`` needs ``shape``, ``dtype`` and ``weak_type`` attributes and a ``__jax_array__``
    method returning its (fetched, cached) ``jax.Array``.
    """
    try:
        from jax._src import core, dtypes
        from jax._src.interpreters import pxla

        aval_table = core.pytype_aval_mappings
        shard_table = pxla.shard_arg_handlers
        shard_args = pxla.shard_args
        canonicalize = dtypes.register_canonicalize_value_handler
        shaped_array = core.ShapedArray
    except (ImportError, AttributeError) as exc:
        UNSUPPORTED.append(f"jax's private registries moved ({exc}); use jnp.asarray(x)")
        return

    def aval(x: Any) -> Any:
        return shaped_array(x.shape, x.dtype, weak_type=x.weak_type)

    def shard(xs: Sequence[Any], shardings: Sequence[Any], layouts: Sequence[Any],
              copy_semantics: Sequence[Any]) -> Sequence[Any]:
        return shard_args(shardings, layouts, copy_semantics,
                          [x.__jax_array__() for x in xs])

    aval_table[cls] = aval
    shard_table[cls] = shard
    canonicalize(cls, lambda x: x.__jax_array__())
