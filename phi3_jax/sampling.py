"""Logits processors, the choice of the next token and its logprobs, per row.

Every setting is an array indexed by row (`RowSampling`), so each row of a batch has its own
temperature, top-k, top-p, min-p and repetition penalty, and a new value compiles nothing. A
setting at its "off" value (penalty 1, top-k 0, top-p 1, min-p 0) leaves the scores exactly as
they are, and a row with temperature 0 decodes greedily.

Order and semantics are transformers' `generate` (generation/utils.py `_get_logits_processor`):
the repetition penalty first (it applies to greedy decoding too), then, for sampling rows, the
warpers temperature, top-k, top-p, min-p. All work on fp32 scores [B, V], as transformers
upcasts the last logits to fp32 before processing. `min_tokens_to_keep` is transformers'
default of 1.

Randomness is per row too: a row draws with its own key, made from its request's seed and the
position of the token being drawn (`row_keys`), so a request's samples never depend on its
slot, its batch or when it arrived.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG_INF = float("-inf")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowSampling:
    """Per-row settings, each [B]: the pytree a compiled step takes as traced arguments."""

    temperature: jax.Array  # f32, 0 = greedy
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # f32, 1 = off
    min_p: jax.Array  # f32, 0 = off
    repetition_penalty: jax.Array  # f32, 1 = off


def process(logits: jax.Array, seen: jax.Array, s: RowSampling) -> jax.Array:
    """fp32 scores [B, V] after every processor; `seen` [B, V] marks each row's tokens."""
    scores = logits.astype(jnp.float32)
    # Repetition penalty: divides positive, multiplies negative scores of every token already
    # in the row (prompt included), once per token however often it occurred.
    penalty = s.repetition_penalty[:, None]
    penalised = jnp.where(scores < 0, scores * penalty, scores / penalty)
    scores = jnp.where(seen & (penalty != 1), penalised, scores)
    sampling = s.temperature > 0
    scores = scores / jnp.where(sampling, s.temperature, 1.0)[:, None]
    # The sorts and the softmax cost more than the rest of a small model's step on a CPU:
    # each runs only when some row asks for it.
    filtered = (sampling & ((s.top_k > 0) | (s.top_p < 1))).any()
    scores = jax.lax.cond(filtered, _top_k_top_p, lambda x, *_: x, scores, s.top_k, s.top_p)
    return jax.lax.cond((sampling & (s.min_p > 0)).any(), _min_p, lambda x, _: x, scores,
                        s.min_p)


def _top_k_top_p(scores: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Top-k, then top-p on what top-k kept, from one sort."""
    V = scores.shape[-1]
    descending = -jnp.sort(-scores, axis=-1)  # [B, V]
    # Top-k keeps the k highest scores and every score tied with the k-th.
    k = jnp.where(top_k > 0, jnp.clip(top_k, 1, V), V)
    kth = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)  # [B, 1]
    scores = jnp.where(scores < kth, _NEG_INF, scores)
    # Top-p: drops the least likely tokens whose cumulative probability (summed from the least
    # likely up) stays <= 1 - p; the most likely token always survives. Masking the tail of the
    # descending sort keeps it sorted, so it serves top-p too.
    ascending = jnp.where(descending < kth, _NEG_INF, descending)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = (cumulative <= 1 - top_p[:, None]) & (top_p < 1)[:, None]
    removed = removed.at[:, -1].set(False)
    # The removed tokens are a prefix of the ascending order, so they are exactly those below
    # the first kept score: a threshold replaces transformers' scatter back.
    first_kept = jnp.sum(removed, axis=-1, keepdims=True)  # [B, 1]
    threshold = jnp.take_along_axis(ascending, first_kept, axis=-1)  # [B, 1]
    return jnp.where(scores < threshold, _NEG_INF, scores)


def _min_p(scores: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drops tokens whose probability is below p times the most likely token's."""
    probs = jax.nn.softmax(scores, axis=-1)  # [B, V]
    top = jnp.max(probs, axis=-1, keepdims=True)
    # The most likely token has probability top >= p * top, so it is never dropped.
    return jnp.where(probs < min_p[:, None] * top, _NEG_INF, scores)


def row_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """[B] PRNG keys: one per row from its seed [B, 2] uint32 (low, high words) and the position
    [B] of the token it draws."""
    def one(seed: jax.Array, position: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(seed[0]), seed[1])
        return jax.random.fold_in(key, position)

    return jax.vmap(one)(seeds, positions)


def choose(logits: jax.Array, seen: jax.Array, s: RowSampling, keys: jax.Array) -> jax.Array:
    """Next tokens [B] int32: argmax of the processed scores for greedy rows, else a draw from
    softmax(scores) with the row's own key."""
    scores = process(logits, seen, s)
    greedy = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    sampled = s.temperature > 0
    # A draw makes random bits for the whole vocabulary: only when some row samples.
    drawn = jax.lax.cond(
        sampled.any(),
        lambda: jax.vmap(jax.random.categorical)(keys, scores).astype(jnp.int32),
        lambda: greedy)
    return jnp.where(sampled, drawn, greedy)


def logprobs(logits: jax.Array, tokens: jax.Array,
             top_n: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's own distribution, before any processor (vLLM's and OpenAI's logprobs): the
    log-softmax of the raw logits [B, V] in fp32. Returns the chosen tokens' logprobs [B] and
    the top_n most likely tokens [B, top_n] with their logprobs [B, top_n]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    if top_n == 0:
        B = logits.shape[0]
        return chosen, jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), jnp.float32)
    top_lp, top_ids = jax.lax.top_k(logp, top_n)
    return chosen, top_ids.astype(jnp.int32), top_lp
