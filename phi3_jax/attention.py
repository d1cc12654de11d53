"""Grouped-query attention with a fused qkv projection, RoPE, sliding window and a KV cache.

The fused projection is stored per KV-head group: weight [D, K, G + 2, H], where for KV head k
the slots 0..G-1 are its G query heads, slot G its key and slot G+1 its value. Query head
n = k * G + g, which is the reference's repeat_kv (repeat_interleave) order. One matmul makes
q, k and v, and sharding the K axis gives every device whole groups (Megatron-style tensor
parallelism with no resharding between the projection and attention).

Five attention computations, one contract (mask semantics of `attention_mask`):
- `dot_product_attention`: the plain XLA reference (fp32 scores and softmax), used for every
  call on CPU and TPU, for fp32, and wherever no faster path applies.
- `blocked_causal_attention`: the same computation for a prompt prefill of 512 tokens or more
  on the XLA path, in key blocks with an online softmax: O(T * block) memory instead of
  [B, N, T, T] fp32 scores, and the blocks above the diagonal skipped. Plain XLA, so it serves
  CPUs, TPUs and fp32 alike; its gradient is flash attention's blocked backward pass, so
  fine-tuning (which declares its right-padded rows like a prefill) takes it too.
- `blocked_cached_attention`: a later prompt chunk over its row's cache, in key blocks the
  same way (the fused kernel's causal mask assumes the queries start at position 0).
- `causal_attention`: the prompt prefill of right-padded rows (row b's tokens at slots
  0..len_b-1) through `jax.nn.dot_product_attention` with is_causal, sequence lengths and the
  window. On GPUs with bf16/fp16 this is cuDNN's fused (flash) attention, which never
  materialises the [B, N, T, S] scores and skips the blocks above the diagonal.
- `decode_attention`: one new token per row (T = 1) as two matmuls over the whole cache. XLA
  lowers the einsum form of a one-query attention to reductions over 96-element rows (11.5 us
  per layer for the 6 MB of keys at batch 1, 1k context on an H100, 18% of bandwidth); here the
  queries become a block-diagonal [K*H, N] matrix, so the keys are read by one plain matmul
  (5.9 us). Measured per decode step against the einsum on the same H100: 4.75 vs 5.55 ms at
  batch 1, 14.5 vs 16.0 ms at batch 64. It spends K times the minimal FLOPs, which tensor
  cores absorb and a CPU would not.

Prefill memory: the fused kernel needs no [T, S] scores, and model.hidden_states makes each
layer's cache write complete before the next layer starts (without that, XLA held every
layer's keys and values until the end of the prefill, and cuDNN prefills of 64 x 960 and
16 x 4096 tokens ran out of memory on the H100; benchmarks/prefill_memory.py). So every bf16/fp16
prefill on a GPU takes the fused kernel, batched or not.

Which of these a model takes is decided once, when it is built or loaded
(`choose_kernels`, `phi3_jax.load(..., attention=...)`), and carried in its graph.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from phi3_jax.cache import CacheUpdate
from phi3_jax.cache import read as cache_read
from phi3_jax.cache import write as cache_write
from phi3_jax.config import Phi3Config
from phi3_jax.hooks import PROBS, Taps, tap, wants
from phi3_jax.params import Einsum
from phi3_jax.rope import apply_rotary

# Query and key block of blocked_causal_attention (see prefill_block). Phi-3-mini's heads, one
# row, fp32, 2 CPU cores, against dot_product_attention: 1024 tokens 134 vs 296 ms (118 vs 256
# MiB), 4096 tokens 1.25 vs 8.55 s (226 MiB vs 4 GiB); 256- and 1024-token blocks were slower
# there. From 512 to 1023 tokens, half blocks: 768 tokens 86 vs 140 ms, 8 x 960 1.25 vs 2.27 s
# (0.5 vs 1.8 GiB), where whole blocks would pad (640 tokens: 151 vs 98 ms).
PREFILL_BLOCK = 512
FUSED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))

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


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          probs_tap: Callable[[jax.Array], jax.Array] | None = None,
                          ) -> jax.Array:
    """q [B, T, K, G, H], k and v [B, S, K, H], mask [B, T, S] -> [B, T, K, G, H].

    probs_tap: sees (and may replace) the probabilities as [B, N, T, S], query head
    n = k * G + g (phi3_jax.hooks' attn.probs point)."""
    scale = q.shape[-1] ** -0.5
    # fp32 island, as in the reference's eager softmax: scores are accumulated and normalised in
    # fp32, and the probabilities cast back to the activation dtype before multiplying V.
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
    # A finite fill (not -inf) keeps fully masked rows (padding queries) finite instead of NaN.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    if probs_tap is not None:
        B, K, G, T, S = probs.shape
        probs = probs_tap(probs.reshape(B, K * G, T, S)).reshape(B, K, G, T, S)
    return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                     sliding_window: int | None, implementation: str = "cudnn") -> jax.Array:
    """Prefill attention of right-padded rows: q [B, T, K, G, H], k and v [B, T, K, H], row b
    holding positions 0..lengths[b]-1 at its first slots. Same visible set as attention_mask;
    the outputs of padding queries are zero.

    q becomes [B, T, N, H] with n = k * G + g, the order in which jax (and cuDNN) pair query head
    n with KV head n // G. Softmax accumulates in fp32 in the kernel. implementation="xla" runs
    the same call without a GPU (the CPU tests).
    """
    B, T, K, G, H = q.shape
    window = None if sliding_window is None or sliding_window >= T else (sliding_window - 1, 0)
    out = jax.nn.dot_product_attention(
        q.reshape(B, T, K * G, H), k, v, scale=H ** -0.5, is_causal=True,
        query_seq_lengths=lengths, key_value_seq_lengths=lengths, local_window_size=window,
        implementation=implementation)
    valid = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]
    # Kernels leave padding queries unspecified (cuDNN may write anything there); zero them, so
    # padding rows stay finite through the layers and in the cache.
    return jnp.where(valid[:, :, None, None], out, 0).reshape(B, T, K, G, H)


def prefill_block(T: int) -> int | None:
    """The block blocked_causal_attention uses for a prefill of T tokens on the XLA path: the
    largest of PREFILL_BLOCK and its half that gives two blocks or more; None (the reference)
    below that."""
    for block in (PREFILL_BLOCK, PREFILL_BLOCK // 2):
        if 2 * block <= T:
            return block
    return None


def _to_blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, T, K, (G,) H] -> block-major [n, B, K, (G,) Tb, H], T zero-padded to n * block
    (padded keys sit past every length, so the mask hides them)."""
    B, T = x.shape[:2]
    n = -(-T // block)
    x = jnp.pad(x, [(0, 0), (0, n * block - T)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(B, n, block, *x.shape[2:])
    # Batch axes first: each step's operands are contiguous, ready-made matmuls.
    return jnp.moveaxis(x, 2, -2).swapaxes(0, 1)


def _from_blocks(x: jax.Array, T: int) -> jax.Array:
    """The inverse of _to_blocks: [n, B, K, (G,) Tb, H] -> [B, T, K, (G,) H]."""
    x = jnp.moveaxis(x.swapaxes(0, 1), -2, 2)  # [B, n, Tb, K, (G,) H]
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :T]


class _BlockMask:
    """Which key blocks each query block reads, and the visible set inside a pair of blocks:
    shared by the forward and the backward pass, so both skip exactly the same blocks."""

    def __init__(self, lengths: jax.Array, sliding_window: int | None, block: int, n: int):
        self.lengths, self.window, self.block = lengths, sliding_window, block
        # No block past the longest row: a bucket's padding costs nothing.
        self.used = jnp.minimum(n, (jnp.max(lengths) + block - 1) // block)
        self.offsets = jnp.arange(block)

    def key_range(self, i: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Key blocks [first, last) that query block i can see: up to its own (causal), and
        from the one holding the earliest key its window reaches."""
        first = 0
        if self.window is not None:
            first = jnp.maximum(0, (i * self.block - self.window + 1) // self.block)
        return first, jnp.minimum(i + 1, self.used)

    def query_range(self, j: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Query blocks [first, last) that can see key block j: key_range's converse."""
        last = self.used
        if self.window is not None:
            last = jnp.minimum(last, (j * self.block + self.block + self.window - 2)
                               // self.block + 1)
        return j, last

    def visible(self, i: jax.Array, j: jax.Array) -> jax.Array:
        """[B, 1, 1, Tb, Sb]: attention_mask's visible set for query block i, key block j."""
        q_idx = i * self.block + self.offsets
        k_idx = j * self.block + self.offsets
        visible = (k_idx[None, :] <= q_idx[:, None])[None] & (
            k_idx[None, None, :] < self.lengths[:, None, None])  # [B, Tb, Sb]
        if self.window is not None:
            visible &= (k_idx[None, :] > q_idx[:, None] - self.window)[None]
        return visible[:, None, None]


def _online_softmax_step(carry: tuple, s: jax.Array, v_block: jax.Array) -> tuple:
    """One key block of flash attention's online softmax: the running max m, sum l and output
    acc (fp32) updated with the block's masked scores s [B, K, G, T, S] and values
    v_block [B, K, S, H]. Shared by the blocked prefill and the blocked cached attention."""
    m, l, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    # A row whose keys so far were all hidden carries garbage with m = lowest; its first
    # visible key makes exp(m - m_new) exactly 0, which wipes it.
    p = jnp.exp(s - m_new[..., None])
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(p, axis=-1)
    pv = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v_block.dtype), v_block,
                    preferred_element_type=jnp.float32)
    return m_new, l, acc * correction[..., None] + pv


def _blocked_forward(q, k, v, lengths, sliding_window, block):
    """(out [B, T, K, G, H], logsumexp [n, B, K, G, Tb] fp32, the softmax's per-query log
    normaliser that the backward pass rebuilds the probabilities from)."""
    B, T, K, G, H = q.shape
    qb, kb, vb = _to_blocks(q, block), _to_blocks(k, block), _to_blocks(v, block)
    n = qb.shape[0]
    blocks = _BlockMask(lengths, sliding_window, block, n)
    scale = H ** -0.5
    lowest = jnp.finfo(jnp.float32).min

    def query_block(i: jax.Array) -> tuple[jax.Array, jax.Array]:
        qi = qb[i]  # [B, K, G, Tb, H]

        def key_block(j, carry):
            # carry: m, l [B, K, G, Tb] and acc [B, K, G, Tb, H], fp32
            s = jnp.einsum("BKGTH,BKSH->BKGTS", qi, kb[j],
                           preferred_element_type=jnp.float32) * scale
            # Masked in every block: splitting the unmasked blocks below the diagonal from the
            # diagonal one measured slower on the CPU (149 vs 142 ms, GQA 2 x 4 x 64 at 4096).
            s = jnp.where(blocks.visible(i, j), s, lowest)
            return _online_softmax_step(carry, s, vb[j])

        m = jnp.full((B, K, G, block), lowest, jnp.float32)
        init = (m, jnp.zeros_like(m), jnp.zeros((B, K, G, block, H), jnp.float32))
        # A block of padding queries alone runs no step (it is zeroed below).
        m, l, acc = jax.lax.fori_loop(*blocks.key_range(i), key_block, init)
        seen = l > 0
        out = (acc / jnp.where(seen, l, 1)[..., None]).astype(v.dtype)  # [B, K, G, Tb, H]
        return out, jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1)), 0.0)

    out, lse = jax.lax.map(query_block, jnp.arange(n))  # [n, B, K, G, Tb, H], [n, B, K, G, Tb]
    valid = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]
    return jnp.where(valid[:, :, None, None, None], _from_blocks(out, T), 0), lse


def _blocked_backward(sliding_window, block, residuals, d_out):
    """Flash attention's backward pass over the forward's blocks: for each key block, the query
    blocks that see it, with the probabilities rebuilt from the saved logsumexp (nothing of size
    T x T is stored). dK and dV accumulate per key block; dQ in one fp32 buffer [n, ...]."""
    q, k, v, lengths, out, lse = residuals
    T, H = q.shape[1], q.shape[-1]
    valid = jnp.arange(T)[None, :] < lengths[:, None]
    d_out = jnp.where(valid[:, :, None, None, None], d_out, 0).astype(out.dtype)
    qb, kb, vb, dob = (_to_blocks(a, block) for a in (q, k, v, d_out))
    n = qb.shape[0]
    blocks = _BlockMask(lengths, sliding_window, block, n)
    scale = H ** -0.5
    # softmax's Jacobian term: rowsum(dO * O) per query, fp32.
    delta = _to_blocks(jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
                       [..., None], block)[..., 0]  # [n, B, K, G, Tb]

    def key_block(j, carry):
        dq, dk, dv = carry

        def query_block(i, inner):
            dq, dk_j, dv_j = inner
            qi, doi = qb[i], dob[i]
            s = jnp.einsum("BKGTH,BKSH->BKGTS", qi, kb[j],
                           preferred_element_type=jnp.float32) * scale
            p = jnp.where(blocks.visible(i, j), jnp.exp(s - lse[i][..., None]), 0.0)
            dv_j += jnp.einsum("BKGTS,BKGTH->BKSH", p.astype(v.dtype), doi,
                               preferred_element_type=jnp.float32)
            dp = jnp.einsum("BKGTH,BKSH->BKGTS", doi, vb[j], preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[i][..., None])).astype(q.dtype)
            dq = dq.at[i].add(jnp.einsum("BKGTS,BKSH->BKGTH", ds, kb[j],
                                         preferred_element_type=jnp.float32) * scale)
            dk_j += jnp.einsum("BKGTS,BKGTH->BKSH", ds, qi,
                               preferred_element_type=jnp.float32) * scale
            return dq, dk_j, dv_j

        zeros = jnp.zeros(kb.shape[1:], jnp.float32)
        dq, dk_j, dv_j = jax.lax.fori_loop(*blocks.query_range(j), query_block,
                                           (dq, zeros, zeros))
        return dq, dk.at[j].set(dk_j), dv.at[j].set(dv_j)

    init = (jnp.zeros(qb.shape, jnp.float32), jnp.zeros(kb.shape, jnp.float32),
            jnp.zeros(vb.shape, jnp.float32))
    dq, dk, dv = jax.lax.fori_loop(0, blocks.used, key_block, init)
    return (_from_blocks(dq, T).astype(q.dtype), _from_blocks(dk, T).astype(k.dtype),
            _from_blocks(dv, T).astype(v.dtype), None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blocked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                             sliding_window: int | None, block: int) -> jax.Array:
    """causal_attention's contract (right-padded rows, padding queries zeroed) in O(T * block)
    memory, in plain XLA: flash attention's online softmax over key blocks, for each query
    block in turn. The reference's [B, N, T, T] fp32 scores cannot exist for long prompts
    (Phi-3-mini at 114,688 tokens: 1.6 TiB), and no fused kernel serves CPUs, TPUs or fp32.

    Query block i reads only key blocks that can be visible: up to its own (causal), and from
    the first one its window reaches. Scores and the softmax's running max and sum stay fp32;
    each block's exp(scores - running max) is cast to v's dtype for the PV matmul, as the
    reference casts its probabilities. Differentiable (fine-tuning on long rows): the loops have
    data-dependent bounds, which reverse mode cannot take, so the gradient is flash attention's
    blocked backward pass (_blocked_backward), in the same memory.
    """
    return _blocked_forward(q, k, v, lengths, sliding_window, block)[0]


def _blocked_vjp_forward(q, k, v, lengths, sliding_window, block):
    out, lse = _blocked_forward(q, k, v, lengths, sliding_window, block)
    return out, (q, k, v, lengths, out, lse)


blocked_causal_attention.defvjp(_blocked_vjp_forward, _blocked_backward)


def blocked_cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, starts: jax.Array,
                             sliding_window: int | None, block: int) -> jax.Array:
    """A later prompt chunk's attention over its row's cache in O(T * block) memory: queries
    q [B, T, K, G, H] at positions starts[b] .. starts[b] + T - 1, keys and values k, v
    [B, S, K, H] at positions 0 .. S - 1 (the cache slots read, the chunk's own included).
    Same visible set as attention_mask, same fp32 islands as blocked_causal_attention: an
    online softmax over key blocks, visiting only the blocks some query can see. A 512-token
    chunk 100k tokens into a prompt would otherwise build [N, 512, 100k] fp32 scores per layer
    (6.5 GB for Phi-3-mini's 32 heads)."""
    B, T, K, G, H = q.shape
    S = k.shape[1]
    kb, vb = _to_blocks(k, block), _to_blocks(v, block)  # [n, B, K, block, H]
    n = kb.shape[0]
    q_pos = starts[:, None] + jnp.arange(T)[None, :]  # [B, T]
    qt = jnp.moveaxis(q, 1, 3)  # [B, K, G, T, H]
    scale = H ** -0.5
    lowest = jnp.finfo(jnp.float32).min
    offsets = jnp.arange(block)

    def key_block(j, carry):
        # carry: m, l [B, K, G, T] and acc [B, K, G, T, H], fp32
        s = jnp.einsum("BKGTH,BKSH->BKGTS", qt, kb[j], preferred_element_type=jnp.float32) * scale
        k_pos = j * block + offsets  # [block]
        visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos < S)[None, None, :]
        if sliding_window is not None:
            visible &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
        s = jnp.where(visible[:, None, None], s, lowest)
        return _online_softmax_step(carry, s, vb[j])

    m = jnp.full((B, K, G, T), lowest, jnp.float32)
    init = (m, jnp.zeros_like(m), jnp.zeros((B, K, G, T, H), jnp.float32))
    # Blocks holding a key some query sees: from the window's reach of the earliest query to
    # the block of the latest one.
    last = jnp.minimum(n, (jnp.max(starts) + T + block - 1) // block)
    first = 0
    if sliding_window is not None:
        first = jnp.maximum(0, (jnp.min(starts) - sliding_window + 1) // block)
    m, l, acc = jax.lax.fori_loop(first, last, key_block, init)
    out = acc / jnp.where(l > 0, l, 1)[..., None]
    return jnp.moveaxis(out.astype(v.dtype), 3, 1)  # [B, T, K, G, H]


def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """dot_product_attention for T = 1 as two matmuls: q [B, 1, K, G, H], k and v [B, S, K, H],
    mask [B, 1, S] -> [B, 1, K, G, H]. Same fp32 islands and roundings as the reference.

    Query head n = j * G + g is the column n of a block-diagonal [K*H, N] matrix holding
    q[j, g] in rows j*H .. j*H+H-1 and zeros elsewhere, so scores [B, N, S] = Q^T [S, K*H]^T is
    one matmul reading each cached key once; probs @ V [S, K*H] gives every head against every
    KV head, of which the diagonal blocks are the output. Exact: the zeros add nothing.
    """
    B, _, K, G, H = q.shape
    S = k.shape[1]
    eye = jnp.eye(K, dtype=q.dtype)
    blocks = jnp.einsum("BJGH,KJ->BKHJG", q[:, 0], eye).reshape(B, K * H, K * G)
    scores = jnp.einsum("BEN,BSE->BNS", blocks, k.reshape(B, S, K * H),
                        preferred_element_type=jnp.float32) * H ** -0.5
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)  # mask [B, 1, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, N, S]
    # In v's dtype, as the reference's probs @ V (accumulated in fp32 by the matmul): K times
    # the output is written, so an fp32 result doubled that traffic (25 MB per layer at B=64).
    every = jnp.einsum("BNS,BSE->BNE", probs, v.reshape(B, S, K * H)).reshape(B, K, G, K, H)
    out = jnp.diagonal(every, axis1=1, axis2=3)  # [B, G, H, K]
    return jnp.transpose(out, (0, 3, 1, 2))[:, None]


ATTENTION_CHOICES = ("auto", "xla", "blocked", "cudnn")


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The attention computations a model takes, chosen once when it is built or loaded
    (`choose_kernels`) and carried in its graph as a static attribute, so every traced call
    takes the same ones and no call reads the environment.

    prefill: "cudnn" (the fused causal kernel), "blocked" (blocked_causal_attention from two
    blocks, the reference below) or "xla" (the reference dot_product_attention everywhere).
    decode: "matmul" (decode_attention) or "einsum" (dot_product_attention) for one-token steps.
    two_row_gemv: a one-token o_proj runs as a two-row matmul (see Attention.__call__).
    quantized_matmul: how quantized weights multiply (phi3_jax.quantize): "blocked" (a loop
    over dequantized fp32 tiles; the CPU on one device) or "xla" (the dequantization left for
    XLA to fuse into the dot, and for GSPMD to partition).
    """

    prefill: str = "blocked"
    decode: str = "einsum"
    two_row_gemv: bool = False
    quantized_matmul: str = "xla"


def choose_kernels(choice: str = "auto", dtype: jnp.dtype = jnp.float32, *,
                   backend: str | None = None, heads_split: bool = False,
                   sharded: bool = False) -> Kernels:
    """The Kernels for `choice` ("auto", "xla", "blocked" or "cudnn"), activations in `dtype` on
    `backend` (default: JAX's default backend).

    "auto" takes the fast paths on GPUs (cuDNN's fused prefill in bf16/fp16, the blocked one in
    fp32, the matmul decode) and the blocked prefill with the einsum decode elsewhere.
    "cudnn" asks for the fused kernel and is refused where it cannot run (no GPU, or fp32: cuDNN
    has no fp32 kernel). `heads_split`: the KV heads are split over a mesh axis, where the
    block-diagonal decode matmul would contract over the split axis (an all-reduce per layer),
    so decode keeps the einsum, which XLA partitions without communication.

    Quantized weights multiply by blocks of dequantized tiles on the CPU (XLA's CPU backend
    does not fuse a convert into a dot: the "xla" path would build a full-size fp32 copy of
    each weight per step) unless the model is `sharded` over a mesh, where the blocks' dynamic
    slices would gather the split weights; everywhere else XLA fuses and partitions it.
    """
    kernels = _attention_kernels(choice, dtype, backend or jax.default_backend(), heads_split)
    blocked = (backend or jax.default_backend()) == "cpu" and not sharded
    return dataclasses.replace(kernels, quantized_matmul="blocked" if blocked else "xla")


def _attention_kernels(choice: str, dtype: jnp.dtype, backend: str,
                       heads_split: bool) -> Kernels:
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {choice!r}")
    gpu = backend == "gpu"
    fused = jnp.dtype(dtype) in FUSED_DTYPES
    if choice == "cudnn":
        if not gpu:
            raise ValueError(f"attention='cudnn' needs a GPU; this backend is {backend!r}")
        if not fused:
            raise ValueError(f"attention='cudnn' needs bfloat16 or float16 activations (cuDNN "
                             f"has no {jnp.dtype(dtype).name} kernel)")
    if choice == "xla":
        return Kernels(prefill="xla", decode="einsum", two_row_gemv=False)
    if choice == "blocked":
        return Kernels(prefill="blocked", decode="einsum", two_row_gemv=False)
    if not gpu:  # "auto" off GPUs
        return Kernels(prefill="blocked", decode="einsum", two_row_gemv=False)
    return Kernels(prefill="cudnn" if fused else "blocked",
                   decode="einsum" if heads_split else "matmul", two_row_gemv=True)


class Attention(nnx.Module):
    def __init__(self, config: Phi3Config, dtype: jnp.dtype, rngs: nnx.Rngs):
        D, K, G, H = (config.hidden_size, config.num_key_value_heads, config.group_size,
                      config.head_dim)
        N = config.num_attention_heads
        self.qkv_proj = Einsum("BTD,DKCH->BTKCH", (D, K, G + 2, H),
                               ("embed", "kv_heads", None, "head_dim"), dtype, rngs)
        self.o_proj = Einsum("BTNH,NHD->BTD", (N, H, D), ("heads", "head_dim", "embed"), dtype,
                             rngs)
        self.sliding_window = config.sliding_window

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None = None,
                 update: CacheUpdate | None = None, lengths: jax.Array | None = None,
                 paths: Kernels | None = None, taps: Taps | None = None,
                 positions: jax.Array | None = None,
                 captured: dict[str, jax.Array] | None = None,
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, D]; cos/sin [B, T, d]; mask [B, T, S] (S: the keys attention reads).

        Without a cache, or with one and `update.read_len == 0` (a prompt's first chunk),
        attention reads the T new keys (S = T). `lengths` [B] then declares right-padded rows
        (row b's tokens at its first lengths[b] slots, positions 0..lengths[b]-1), which lets
        the prefill kernels run: cuDNN's fused causal attention or the blocked attention. With a
        cache, the new keys and values are written to one layer's kv ([R, S_max, K, H] each)
        where `update` says, and otherwise attention reads the cache's first update.read_len
        slots (a decode step, or a later prompt chunk). `paths` defaults to
        choose_kernels("auto", x.dtype).

        `taps` (phi3_jax.hooks): the layer's hooks and captures at the attn.* points, given
        the tokens' `positions` [B, T]; captured values go into `captured`. Hooks on k and v
        act before the cache write, so the cache holds what they made. Tapping attn.probs
        takes the reference attention (dot_product_attention), which has them.
        """
        B, T, _ = x.shape
        paths = paths if paths is not None else choose_kernels("auto", x.dtype)
        qkv = self.qkv_proj(x)  # [B, T, K, G + 2, H]
        K, G = qkv.shape[2], qkv.shape[3] - 2
        q = apply_rotary(qkv[:, :, :, :G], cos, sin)  # [B, T, K, G, H]
        k = apply_rotary(qkv[:, :, :, G], cos, sin)  # [B, T, K, H]
        v = qkv[:, :, :, G + 1]  # [B, T, K, H]
        if taps is not None:
            H = q.shape[-1]
            q = tap(taps, "attn.q", q.reshape(B, T, K * G, H), positions, captured)
            q = q.reshape(B, T, K, G, H)
            k = tap(taps, "attn.k", k, positions, captured)
            v = tap(taps, "attn.v", v, positions, captured)
        probs_tap = None
        if wants(taps, PROBS):
            def probs_tap(p):
                return tap(taps, PROBS, p, positions, captured)
        if lengths is not None:
            # Padding slots hold zeros: never NaN, whatever a kernel leaves in padding rows.
            valid = (jnp.arange(T)[None, :] < lengths[:, None])[:, :, None, None]
            k, v = jnp.where(valid, k, 0), jnp.where(valid, v, 0)
        if kv is not None:
            kv = cache_write(*kv, k, v, update)
        if kv is None or update.read_len == 0:
            block = prefill_block(T)
            if probs_tap is not None:
                out = dot_product_attention(q, k, v, mask, probs_tap)
            elif lengths is not None and paths.prefill == "cudnn":
                out = causal_attention(q, k, v, lengths, self.sliding_window)
            elif lengths is not None and paths.prefill == "blocked" and block is not None:
                out = blocked_causal_attention(q, k, v, lengths, self.sliding_window, block)
            else:
                out = dot_product_attention(q, k, v, mask)  # [B, T, K, G, H]
        else:
            k, v = cache_read(*kv, update)  # [B, read_len, K, H]
            block = prefill_block(update.read_len)
            if probs_tap is not None:
                out = dot_product_attention(q, k, v, mask, probs_tap)
            elif T == 1 and paths.decode == "matmul":
                out = decode_attention(q, k, v, mask)
            elif T > 1 and paths.prefill != "xla" and block is not None:
                out = blocked_cached_attention(q, k, v, update.starts, self.sliding_window,
                                               block)
            else:
                out = dot_product_attention(q, k, v, mask)
        out = out.reshape(B, T, -1, out.shape[-1])  # [B, T, N, H]
        out = tap(taps, "attn.heads", out, positions, captured)
        if B * T == 1 and paths.two_row_gemv:
            # XLA's GPU simplifier turns a vector-matrix product whose operands hold under 10M
            # elements into a multiply + column reduction: Phi-3-mini's 3072 x 3072 o_proj ran
            # at 37% of bandwidth (17 us per layer on the H100). A second (zero) row makes it a
            # matrix product, which the matmul kernels read at full speed.
            return self.o_proj(jnp.concatenate([out, jnp.zeros_like(out)]))[:1], kv
        return self.o_proj(out), kv
