"""The causal language-modelling loss, with Hugging Face's label convention.

`labels[b, t]` is the token expected at position t (unshifted, as in transformers); the logits at
t - 1 predict it. IGNORE (-100) marks tokens that are not targets: the prompt, padding, anything a
dataset chooses to mask. The loss is a fp32 island: logits are upcast before the log-softmax, as
transformers' `ForCausalLMLoss` does, because a bf16 logsumexp over a 32k vocabulary loses the
small differences the gradient is made of.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IGNORE = -100


def token_loss_sum(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of the per-token cross-entropies [] fp32, number of target tokens [] int32).

    logits [B, T, V] (any float dtype), labels [B, T] int. Returning the sum and the count, not
    their ratio, lets gradient accumulation divide once by the token count of the whole step, so
    accumulated micro-batches give exactly the gradient of the full batch.
    """
    logits = logits[:, :-1].astype(jnp.float32)  # [B, T-1, V]: position t predicts t + 1
    targets = labels[:, 1:]  # [B, T-1]
    valid = targets != IGNORE
    safe = jnp.where(valid, targets, 0)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T-1]
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]  # [B, T-1]
    losses = jnp.where(valid, log_z - picked, 0.0)
    return jnp.sum(losses), jnp.sum(valid, dtype=jnp.int32)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy over the target tokens (0 when there are none), fp32 []."""
    total, count = token_loss_sum(logits, labels)
    return total / jnp.maximum(count, 1)
