"""Grouped-query attention with a fused qkv projection, RoPE, sliding window and a KV cache.

The fused projection is stored per KV-head group: weight [D, K, G + 2, H], where for KV head k
the slots 0..G-1 are its G query heads, slot G its key and slot G+1 its value. Query head
n = k * G + g, which is the reference's repeat_kv (repeat_interleave) order. One matmul makes
q, k and v, and sharding the K axis gives every device whole groups (Megatron-style tensor
parallelism with no resharding between the projection and attention).

Opt-in, not yet verified on a GPU: with PHI3_JAX_ATTENTION=cudnn (read when a function is
traced, so set it before the first call), prefill (T > 1) with bf16/fp16 activations goes through
cuDNN's fused (flash) attention, `jax.nn.dot_product_attention(implementation="cudnn")`, which never
materialises the [B, N, T, S] fp32 scores. Its mask formulation and head pairing are tested on the
CPU through the same call with implementation="xla"; benchmarks/check_fused_attention.py is the
one-call GPU check to run before making it the default on GPUs. Decode (T = 1), fp32, and the
default everywhere use the plain XLA path below.
"""

from __future__ import annotations

import os

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


ATTENTION_ENV = "PHI3_JAX_ATTENTION"
FUSED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def attention_impl(dtype: jnp.dtype) -> str:
    """"cudnn" or "xla": the prefill attention for activations of `dtype`.

    "xla" unless PHI3_JAX_ATTENTION=cudnn (opt-in until verified on a GPU); fp32 always takes the
    XLA path, since cuDNN's fused attention has no fp32 kernel (and fp32 is the reference).
    """
    choice = os.environ.get(ATTENTION_ENV, "").strip().lower()
    if choice not in ("", "xla", "cudnn"):
        raise ValueError(f"{ATTENTION_ENV}={choice!r}: expected 'xla' or 'cudnn'")
    return "cudnn" if choice == "cudnn" and jnp.dtype(dtype) in FUSED_DTYPES else "xla"


def fused_mask(mask: jax.Array) -> jax.Array:
    """attention_mask's [B, T, S] as the [B, 1, T, S] boolean mask the fused kernel takes.

    With left padding and per-row positions the visible set is not causal-by-index with
    sequence lengths (padding sits at the start of a row), so the whole mask is passed; jax
    turns it into an additive bias broadcast over the heads.
    """
    return mask[:, None]


def fused_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                                implementation: str = "cudnn") -> jax.Array:
    """dot_product_attention's contract through jax.nn.dot_product_attention.

    q [B, T, K, G, H] becomes [B, T, N, H] with n = k * G + g, the order in which jax (and
    cuDNN) pair query head n with KV head n // G. Softmax accumulates in fp32 in the kernel.
    `implementation="xla"` runs the same call without a GPU (the CPU tests).
    """
    B, T, K, G, H = q.shape
    out = jax.nn.dot_product_attention(q.reshape(B, T, K * G, H), k, v, mask=fused_mask(mask),
                                       scale=H ** -0.5, implementation=implementation)
    return out.reshape(B, T, K, G, H)


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
        if T > 1 and q.dtype == k.dtype and attention_impl(q.dtype) == "cudnn":
            out = fused_dot_product_attention(q, k, v, mask)  # [B, T, K, G, H]
        else:
            out = dot_product_attention(q, k, v, mask)  # [B, T, K, G, H]
        out = out.reshape(B, T, -1, out.shape[-1])  # [B, T, N, H]
        return self.o_proj(out), kv
