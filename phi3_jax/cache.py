"""The KV cache: a pytree of static-shape arrays, written in place (donate it to the jitted step).

Slots are shared by the batch: prompts are padded to one length, so the next token of every row
is written to the same slot `index`. `positions` records each slot's
token position per row (-1 for padding and empty slots); attention masks are derived from it,
which keeps padding, causality and the sliding window in one place (phi3_jax.attention).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from phi3_jax.config import Phi3Config


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, S, K, H], keys already rotated
    v: tuple[jax.Array, ...]  # per layer [B, S, K, H]
    positions: jax.Array  # [B, S] int32, -1 where empty
    index: jax.Array  # [] int32, the next slot to write

    @classmethod
    def init(cls, config: Phi3Config, batch: int, max_len: int, dtype: jnp.dtype) -> KVCache:
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        layers = range(config.num_hidden_layers)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in layers),
            v=tuple(jnp.zeros(shape, dtype) for _ in layers),
            positions=jnp.full((batch, max_len), -1, jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]
