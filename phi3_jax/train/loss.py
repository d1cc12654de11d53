"""The causal language-modelling loss, with Hugging Face's label convention.

`labels[b, t]` is the token expected at position t (unshifted, as in transformers); the logits at
t - 1 predict it. IGNORE (-100) marks tokens that are not targets: the prompt, padding, anything a
dataset chooses to mask. The loss is a fp32 island: logits are upcast before the log-softmax, as
transformers' `ForCausalLMLoss` does, because a bf16 logsumexp over a 32k vocabulary loses the
small differences the gradient is made of.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

IGNORE = -100
# Tokens per chunk of head_loss_sum (all rows together): fp32 logits of 1024 tokens are 128 MiB
# at Phi-3's 32k vocabulary and 780 MiB at Phi-4-mini's 200k.
LOSS_CHUNK_TOKENS = 1024


def _loss_sum(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of cross-entropies, count) of logits [..., V] against targets [...]."""
    logits = logits.astype(jnp.float32)
    valid = targets != IGNORE
    safe = jnp.where(valid, targets, 0)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    losses = jnp.where(valid, log_z - picked, 0.0)
    return jnp.sum(losses), jnp.sum(valid, dtype=jnp.int32)


def token_loss_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of the per-token cross-entropies [] fp32, number of target tokens [] int32).

    logits [B, T, V] (any float dtype), labels [B, T] int. Returning the sum and the count, not
    their ratio, lets gradient accumulation divide once by the token count of the whole step, so
    accumulated micro-batches give exactly the gradient of the full batch.
    """
    # Position t predicts t + 1.
    return _loss_sum(logits[:, :-1], labels[:, 1:])


def head_loss_sum(x: jax.Array, head: Callable[[jax.Array], jax.Array], labels: jax.Array,
                  chunk_tokens: int = LOSS_CHUNK_TOKENS) -> tuple[jax.Array, jax.Array]:
    """token_loss_sum(head(x), labels) without the [B, T, V] logits: x [B, T, D] goes through
    `head` ([b, t, D] -> [b, t, V]) a chunk of positions at a time, and each chunk's logits are
    recomputed in the backward pass instead of stored. The per-token losses are the same numbers
    (the same head matmul per token); only the order of the final sum changes.

    Full logits, their fp32 copy and their gradient cost 12+ bytes per token per vocabulary
    entry: 20 GB for 4 x 2048 tokens of Phi-4-mini (200k vocabulary); here one chunk's worth.
    Chunks run along the sequence with every row in each, so a batch split over a mesh's data
    axis stays split.
    """
    B, T, D = x.shape
    x, targets = x[:, :-1], labels[:, 1:]  # position t predicts t + 1
    c = max(1, min(T - 1, chunk_tokens // B))  # positions per chunk
    n = -(-(T - 1) // c)
    pad = n * c - (T - 1)
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE)
    targets = targets.reshape(B, n, c).swapaxes(0, 1)  # [n, B, c]

    @jax.checkpoint
    def chunk(x, targets):
        return _loss_sum(head(x), targets)

    def step(carry, inputs):
        total, count = chunk(*inputs)
        return (carry[0] + total, carry[1] + count), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (total, count), _ = jax.lax.scan(step, init, (x, targets))
    return total, count


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy over the target tokens (0 when there are none), fp32 []."""
    total, count = token_loss_sum(logits, labels)
    return total / jnp.maximum(count, 1)
