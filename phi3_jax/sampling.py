"""Logits processors and the choice of the next token, as small jit-friendly pytrees.

Each processor is a frozen dataclass registered as a pytree whose numbers are leaves: they are
traced under jit, so a new temperature or top-p reuses the compiled step, while the *set* of
processors (and greedy vs sampling) is structure, hence static.

Order and semantics are transformers' `generate` (generation/utils.py `_get_logits_processor`):
repetition penalty first (it also applies to greedy decoding), then, only when sampling, the
warpers temperature, top-k, top-p, min-p. All work on fp32 scores [B, V], as transformers upcasts
the last logits to fp32 before processing. `min_tokens_to_keep` is transformers' default of 1
(it is larger only for beam search, which we do not do).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

_NEG_INF = float("-inf")


def _pytree(cls: type) -> type:
    """A frozen dataclass whose fields are pytree leaves (traced numbers under jit)."""
    return jax.tree_util.register_dataclass(dataclasses.dataclass(frozen=True)(cls))


@_pytree
class RepetitionPenalty:
    """Divides positive, multiplies negative scores of every token already in the row (prompt
    included, padding excluded), once per token however often it occurred."""

    penalty: Any  # float > 0

    def __call__(self, logits: jax.Array, seen: jax.Array) -> jax.Array:
        # logits [B, V] f32; seen [B, V] bool
        penalised = jnp.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return jnp.where(seen, penalised, logits)


@_pytree
class Temperature:
    temperature: Any  # float > 0

    def __call__(self, logits: jax.Array, seen: jax.Array) -> jax.Array:
        return logits / self.temperature


@_pytree
class TopK:
    """Keeps the k highest scores (and every score tied with the k-th)."""

    k: Any  # int >= 1

    def __call__(self, logits: jax.Array, seen: jax.Array) -> jax.Array:
        V = logits.shape[-1]
        k = jnp.clip(self.k, 1, V)
        # A sort rather than lax.top_k, whose k must be static: k stays a traced number.
        descending = -jnp.sort(-logits, axis=-1)  # [B, V]
        kth = jax.lax.dynamic_index_in_dim(descending, k - 1, axis=-1)  # [B, 1]
        return jnp.where(logits < kth, _NEG_INF, logits)


@_pytree
class TopP:
    """Nucleus filtering: drops the least likely tokens whose cumulative probability (summed from
    the least likely up) stays <= 1 - p; the most likely token always survives."""

    p: Any  # float in [0, 1]

    def __call__(self, logits: jax.Array, seen: jax.Array) -> jax.Array:
        ascending = jnp.sort(logits, axis=-1)  # [B, V]
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        removed = cumulative <= 1 - self.p
        removed = removed.at[:, -1].set(False)
        # The removed tokens are a prefix of the ascending order, so they are exactly those
        # below the first kept score: a threshold replaces transformers' scatter back.
        first_kept = jnp.sum(removed, axis=-1, keepdims=True)  # [B, 1]
        threshold = jnp.take_along_axis(ascending, first_kept, axis=-1)  # [B, 1]
        return jnp.where(logits < threshold, _NEG_INF, logits)


@_pytree
class MinP:
    """Drops tokens whose probability is below p times the most likely token's."""

    p: Any  # float in [0, 1]

    def __call__(self, logits: jax.Array, seen: jax.Array) -> jax.Array:
        probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
        top = jnp.max(probs, axis=-1, keepdims=True)
        # The most likely token has probability top >= p * top, so it is never dropped.
        return jnp.where(probs < self.p * top, _NEG_INF, logits)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampler:
    """The processors in order, then argmax (greedy) or a draw from softmax(scores)."""

    processors: tuple = ()
    greedy: bool = dataclasses.field(default=True, metadata=dict(static=True))

    def process(self, logits: jax.Array, seen: jax.Array) -> jax.Array:
        """fp32 scores [B, V] after every processor; `seen` [B, V] marks each row's tokens."""
        scores = logits.astype(jnp.float32)
        for processor in self.processors:
            scores = processor(scores, seen)
        return scores

    def __call__(self, logits: jax.Array, seen: jax.Array, key: jax.Array) -> jax.Array:
        """Next tokens [B] int32."""
        scores = self.process(logits, seen)
        if self.greedy:
            return jnp.argmax(scores, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, scores, axis=-1).astype(jnp.int32)


def make_sampler(temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float | None = None) -> Sampler:
    """The sampler for these settings, with transformers' processor order and conditions.

    temperature 0 means greedy decoding; top_k, top_p and min_p then have no meaning and are
    refused. top_k 0/None, top_p 1/None, min_p None and repetition_penalty 1/None are off.
    """
    if temperature is None or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer (0 = off), got {top_k!r}")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if min_p is not None and not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    processors: list = []
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(RepetitionPenalty(float(repetition_penalty)))
    if temperature == 0:
        given = [name for name, value, off in (("top_k", top_k, (None, 0)),
                                               ("top_p", top_p, (None, 1.0)),
                                               ("min_p", min_p, (None,)))
                 if value not in off]
        if given:
            raise ValueError(f"{', '.join(given)} only apply when sampling; set temperature > 0 "
                             f"(temperature 0 is greedy decoding)")
        return Sampler(tuple(processors), greedy=True)
    if temperature != 1.0:
        processors.append(Temperature(float(temperature)))
    if top_k:
        processors.append(TopK(int(top_k)))
    if top_p is not None and top_p < 1.0:
        processors.append(TopP(float(top_p)))
    if min_p is not None:
        processors.append(MinP(float(min_p)))
    return Sampler(tuple(processors), greedy=False)
