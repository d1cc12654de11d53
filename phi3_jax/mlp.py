"""The gated MLP: fused gate_up projection (gate first), SiLU, down projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phi3_jax.config import Phi3Config
from phi3_jax.params import Einsum


class MLP(nnx.Module):
    def __init__(self, config: Phi3Config, dtype: jnp.dtype, rngs: nnx.Rngs):
        D, F = config.hidden_size, config.intermediate_size
        # [D, 2, F]: index 0 of the middle axis is the gate, 1 is up. Keeping gate and up on
        # their own axis lets tensor parallelism shard F without splitting a gate from its up.
        self.gate_up_proj = Einsum("BTD,DCF->BTCF", (D, 2, F), ("embed", None, "mlp"), dtype, rngs)
        self.down_proj = Einsum("BTF,FD->BTD", (F, D), ("mlp", "embed"), dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
        gate_up = self.gate_up_proj(x)  # [B, T, 2, F]
        gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
        return self.down_proj(up * jax.nn.silu(gate))
