"""Parameters with logical axis names.

Every weight carries a `logical_axes` tuple (names like "embed", "heads", "mlp", "vocab") as
NNX variable metadata. Sharding maps those names to mesh axes through one rules table
(phi3_jax.sharding), so no module mentions a mesh. A plain metadata key of our own is used
rather than flax's sharding annotations, whose name and eager-sharding behaviour change between
flax releases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The dtypes parameters and activations can take (checkpoint files may hold others).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

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
    """A bias-free projection: `einsum(spec, x, weight)`, with the weight's axes named.

    Quantized (phi3_jax.quantize.quantize_module), `weight` holds the codes, `scale` the scales
    and `quant` their Layout; the product is the same einsum with the dequantized weight."""

    def __init__(self, spec: str, shape: Sequence[int], axes: tuple[str | None, ...],
                 dtype: jnp.dtype, rngs: nnx.Rngs):
        self.spec = spec
        self.weight = param(rngs, shape, axes, dtype)
        self.quant = None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.quant is not None:
            from phi3_jax.quantize import project

            return project(self.spec, x, self.weight[...], self.scale[...], self.quant)
        return jnp.einsum(self.spec, x, self.weight[...])

    @property
    def dense_shape(self) -> tuple[int, ...]:
        """The dense weight's shape, quantized or not."""
        return self.quant.shape if self.quant is not None else tuple(self.weight.shape)

    @property
    def dense_axes(self) -> tuple[str | None, ...]:
        """The dense weight's logical axes, quantized or not."""
        return (self.quant.axes if self.quant is not None
                else tuple(self.weight.get_metadata()["logical_axes"]))


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    """A COMPUTE_DTYPES name or dtype as a jnp.dtype; anything else is refused by name."""
    if isinstance(dtype, str):
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; choose from "
                             f"{sorted(COMPUTE_DTYPES)}")
        return jnp.dtype(COMPUTE_DTYPES[dtype])
    dtype = jnp.dtype(dtype)
    if dtype not in {jnp.dtype(d) for d in COMPUTE_DTYPES.values()}:
        raise ValueError(f"dtype {dtype} is not supported; choose from {sorted(COMPUTE_DTYPES)}")
    return dtype


def place(array: np.ndarray, dtype: jnp.dtype, target: jax.sharding.Sharding | None) -> jax.Array:
    """Puts a host array on device(s) in `dtype`; with a sharding, each device gets its slice."""
    if target is None:
        return jax.device_put(np.asarray(array).astype(dtype, copy=False))
    return jax.make_array_from_callback(
        array.shape, target, lambda index: np.asarray(array[index]).astype(dtype, copy=False))


def fill_state(abstract: nnx.State, arrays: Mapping[tuple, jax.Array]) -> nnx.State:
    """The abstract state with each leaf replaced by arrays[path]; every leaf must be given."""
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        if path not in arrays:
            raise KeyError(f"no value for parameter {'.'.join(map(str, path))}")
        value = arrays[path]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"parameter {'.'.join(map(str, path))}: shape {value.shape} != "
                             f"{var.shape}")
        flat.append((path, var.replace(value)))
    return nnx.from_flat_state(flat)
