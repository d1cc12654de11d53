"""RMSNorm with the reference's cast order (spec section 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phi3_jax.params import param


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype: jnp.dtype):
        self.eps = eps
        self.weight = param(None, (dim,), ("norm",), dtype, ones=True)

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
        # fp32 island: the variance of bf16 activations is inaccurate. The reference casts back to
        # the input dtype *before* multiplying by the weight; we keep that order for parity.
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * h.astype(x.dtype)
