"""The KV cache: rows of keys and values with static shapes, updated in place (donate it).

A row holds one sequence, and the token at position p sits at slot p of its row, so a row's
filled part is its first `length` slots and masks follow from positions alone: no position
table, no holes, no shared write index. The inference engine gives each request a row (its
slot) for as long as it runs.

A model call meets the cache through a `CacheUpdate`: where each batch row's new tokens go and
how much of the cache attention reads. The cache owns the write and the read (`write`, `read`),
so attention has one cache branch.
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

    @classmethod
    def init(cls, config: Phi3Config, rows: int, max_len: int, dtype: jnp.dtype) -> KVCache:
        shape = (rows, max_len, config.num_key_value_heads, config.head_dim)
        layers = range(config.num_hidden_layers)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in layers),
                   v=tuple(jnp.zeros(shape, dtype) for _ in layers))

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CacheUpdate:
    """How a model call's tokens [B, T] meet the cache.

    starts [B]: the position (= slot) of each batch row's first new token; its T tokens go to
    slots starts .. starts + T - 1 (slots past the row's end are dropped).
    row: None when batch row b is cache row b (a decode step over every row); a [] int32
    array: the one cache row a single-row call (B = 1) writes and reads (a prompt chunk); or a
    [B] int32 array of distinct cache rows, batch row b reading and writing row[b] (a decode
    step over a row bucket, in place).
    read_len (static): attention reads slots [0, read_len) of the rows; 0 means it reads only
    the new tokens, which then start at position 0 (a prompt's first chunk: the prefill
    kernels apply).
    """

    starts: jax.Array
    row: jax.Array | None = None
    read_len: int = dataclasses.field(default=0, metadata=dict(static=True))


def write(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
          update: CacheUpdate) -> tuple[jax.Array, jax.Array]:
    """Writes new keys and values k, v [B, T, K, H] into one layer's cache [R, S, K, H]."""
    B, T = k.shape[:2]
    rows = jnp.arange(B) if update.row is None else jnp.broadcast_to(update.row, (B,))
    slots = update.starts[:, None] + jnp.arange(T)[None, :]  # [B, T]
    # A scatter, not dynamic_update_slice: that one would shift a write that runs past the
    # end of the row back into it; here such slots are dropped.
    k_cache = k_cache.at[rows[:, None], slots].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows[:, None], slots].set(v.astype(v_cache.dtype), mode="drop")
    return k_cache, v_cache


def read(k_cache: jax.Array, v_cache: jax.Array,
         update: CacheUpdate) -> tuple[jax.Array, jax.Array]:
    """The keys and values attention reads, each [B, read_len, K, H]."""
    n = update.read_len
    if update.row is None:
        return k_cache[:, :n], v_cache[:, :n]
    if update.row.ndim == 1:  # a gather of the rows' first n slots
        return k_cache[update.row, :n], v_cache[update.row, :n]
    start = (update.row, 0, 0, 0)
    size = (1, n, *k_cache.shape[2:])
    return (jax.lax.dynamic_slice(k_cache, start, size),
            jax.lax.dynamic_slice(v_cache, start, size))


def key_positions(update: CacheUpdate, batch: int) -> jax.Array:
    """[B, read_len] int32: the position of each slot attention reads (slot p holds position
    p; slots past a row's length are later than any of its queries, so causality hides them)."""
    return jnp.broadcast_to(jnp.arange(update.read_len, dtype=jnp.int32),
                            (batch, update.read_len))
