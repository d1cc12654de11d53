"""Grouped-query attention with a fused qkv projection, RoPE, sliding window and a KV cache.

The fused projection is stored per KV-head group: weight [D, K, G + 2, H], where for KV head k
the slots 0..G-1 are its G query heads, slot G its key and slot G+1 its value. Query head
n = k * G + g, which is the reference's repeat_kv (repeat_interleave) order. One matmul makes
q, k and v, and sharding the K axis gives every device whole groups (Megatron-style tensor
parallelism with no resharding between the projection and attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from phi3_jax.config import Phi3Config
from phi3_jax.params import Einsum
from phi3_jax.rope import apply_rotary


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, sliding_window: int | None) -> jax.Array:
    """[B, T, S] bool: query at q_pos [B, T] may see key at k_pos [B, S].

    Negative positions mark padding or empty cache slots. As in the reference, key j is visible
    to query i when j <= i and, with a window W, j > i - W (W keys including the query's own).
    """
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    visible = (k >= 0) & (k <= q)
    if sliding_window is not None:
        visible &= k > q - sliding_window
    return visible


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q [B, T, K, G, H], k and v [B, S, K, H], mask [B, T, S] -> [B, T, K, G, H]."""
    scale = q.shape[-1] ** -0.5
    # fp32 island, as in the reference's eager softmax: scores are accumulated and normalised in
    # fp32, and the probabilities cast back to the activation dtype before multiplying V.
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    # A finite fill (not -inf) keeps fully masked rows (padding queries) finite instead of NaN.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)


class Attention(nnx.Module):
    def __init__(self, config: Phi3Config, dtype: jnp.dtype, rngs: nnx.Rngs):
        D, K, G, H = (config.hidden_size, config.num_key_value_heads, config.group_size,
                      config.head_dim)
        N = config.num_attention_heads
        self.qkv_proj = Einsum("BTD,DKCH->BTKCH", (D, K, G + 2, H),
                               ("embed", "kv_heads", None, "head_dim"), dtype, rngs)
        self.o_proj = Einsum("BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"), dtype,
                             rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None = None,
                 index: jax.Array | None = None,
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, D]; cos/sin [B, T, d]; mask [B, T, S].

        Without a cache S = T. With one, the new keys and values are written at slots
        index .. index + T - 1 of kv ([B, S, K, H] each) and attention reads all S slots.
        """
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)  # [B, T, K, G + 2, H]
        G = qkv.shape[3] - 2
        q = apply_rotary(qkv[:, :, :, :G], cos, sin)  # [B, T, K, G, H]
        k = apply_rotary(qkv[:, :, :, G], cos, sin)  # [B, T, K, H]
        v = qkv[:, :, :, G + 1]  # [B, T, K, H]
        if kv is not None:
            k_cache, v_cache = kv
            start = (0, index, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            kv = (k_cache, v_cache)
            k, v = k_cache, v_cache
        out = dot_product_attention(q, k, v, mask)  # [B, T, K, G, H]
        out = out.reshape(B, T, -1, out.shape[-1])  # [B, T, N, H]
        return self.o_proj(out), kv
