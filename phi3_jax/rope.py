"""Rotary position embeddings: default RoPE, partial rotary and LongRoPE (spec section 2).

Half-split (NeoX) layout: within the rotary width d, dimension i pairs with i + d/2; dimensions
past d pass through unchanged (partial rotary, Phi-4-mini).

LongRoPE keeps two inverse-frequency sets. A sequence uses the short set while its length
(max position + 1) is at most original_max_position_embeddings and the long set after that,
which is the rule transformers applies to a sequence run alone. We decide per row, so a row's
numbers never depend on the other rows of a batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from phi3_jax.config import Phi3Config


def inverse_frequencies(config: Phi3Config) -> tuple[np.ndarray, np.ndarray]:
    """(short, long) inverse frequencies, each [d/2] float32; identical without LongRoPE.

    Built with the reference's float32 operations (exponent, factor product, reciprocal), so
    that the tables match it: at position p an inv_freq off by one ulp moves the angle by
    ~p * 6e-8 rad, i.e. 3e-4 at p = 4k and 1e-2 at p = 128k. The power itself is computed in
    float64 and rounded once: numpy's float32 power is off by an ulp in ~1/4 of the entries,
    while the correctly rounded value matches torch's (which is not itself correctly rounded
    everywhere: it can still differ by one ulp in an occasional entry).
    """
    d = config.rotary_dim
    exponent = np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / np.float32(d)
    base = (np.float64(config.rope_theta) ** exponent.astype(np.float64)).astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        inv = (np.float32(1.0) / base).astype(np.float32)
        return inv, inv
    short = np.float32(1.0) / (np.asarray(rs.short_factor, np.float32) * base)
    long = np.float32(1.0) / (np.asarray(rs.long_factor, np.float32) * base)
    return short.astype(np.float32), long.astype(np.float32)


def attention_scaling(config: Phi3Config) -> float:
    return 1.0 if config.rope_scaling is None else config.rope_scaling.attention_factor


def uses_long_factors(config: Phi3Config, seq_len: jax.Array) -> jax.Array:
    """[B] bool: whether each row's length selects the long factors (always False without them)."""
    if config.rope_scaling is None:
        return jnp.zeros(seq_len.shape, bool)
    return seq_len > config.rope_scaling.original_max_position_embeddings


def rotary_tables(config: Phi3Config, positions: jax.Array, use_long: jax.Array,
                  dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin, each [B, T, d], for integer positions [B, T] and per-row use_long [B].

    The tables are an fp32 island, as in the reference (autocast disabled there): positions up to
    ~1e5 times small frequencies lose all accuracy in bf16. They are cast to the activation dtype
    only at the end, again as the reference does.
    """
    short, long = inverse_frequencies(config)
    inv = jnp.where(use_long[:, None], jnp.asarray(long), jnp.asarray(short))  # [B, d/2]
    freqs = positions.astype(jnp.float32)[:, :, None] * inv[:, None, :]  # [B, T, d/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, d]
    scale = attention_scaling(config)
    cos = jnp.cos(emb) * scale
    sin = jnp.sin(emb) * scale
    return cos.astype(dtype), sin.astype(dtype)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first d features of x [B, T, ..., H] with cos/sin [B, T, d]."""
    d = cos.shape[-1]
    extra = x.ndim - cos.ndim  # head axes between T and H
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + (d,))
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + (d,))
    rot, passthrough = x[..., :d], x[..., d:]
    half = d // 2
    rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    rot = rot * cos + rotated_half * sin
    if passthrough.shape[-1] == 0:
        return rot
    return jnp.concatenate([rot, passthrough], axis=-1)
