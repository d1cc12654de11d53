"""Parameters with logical axis names.

Every weight carries a `logical_axes` tuple (names like "embed", "heads", "mlp", "vocab") as
NNX variable metadata. Sharding maps those names to mesh axes through one rules table
(phi3_jax.sharding), so no module mentions a mesh. A plain metadata key of our own is used
rather than flax's sharding annotations, whose name and eager-sharding behaviour change between
flax releases.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

# Phi-3's initializer_range; used only for random (test, from-scratch) initialisation.
INIT_STD = 0.02


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: tuple[str | None, ...],
          dtype: jnp.dtype, *, ones: bool = False) -> nnx.Param:
    """A weight of `shape` named by `axes`: normal(0.02), or ones (norm scales)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    if ones:
        value = jnp.ones(shape, dtype)
    else:
        value = (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class Einsum(nnx.Module):
    """A bias-free projection: `einsum(spec, x, weight)`, with the weight's axes named."""

    def __init__(self, spec: str, shape: Sequence[int], axes: tuple[str | None, ...],
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        self.spec = spec
        self.weight = param(rngs, shape, axes, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum(self.spec, x, self.weight[...])
