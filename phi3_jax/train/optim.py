"""The optimizer: AdamW on a warmup + cosine schedule, after global-norm clipping.

Optimizer state is fp32 whatever the compute dtype: the trainer keeps fp32 master copies of the
trainable parameters (phi3_jax.train.step) and AdamW's moments follow the parameters' dtype.
Gradient accumulation is not an optax wrapper here: the train step sums the micro-batches'
token-loss gradients and divides once by the step's token count, which is exactly the gradient
of the whole batch (optax.MultiSteps would average per-micro-batch means instead).
"""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    total_steps: int = 1000
    warmup_steps: int = 0
    final_lr_fraction: float = 0.1  # the cosine decays to learning_rate * this at total_steps
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")
        if self.total_steps < 1:
            raise ValueError(f"total steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup steps must be in [0, {self.total_steps}], "
                             f"got {self.warmup_steps}")


def schedule(config: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to final_lr_fraction of it."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.total_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.final_lr_fraction)


def _decay_mask(params):
    # No decay on norm scales (1-D): shrinking them toward 0 rescales whole activations.
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    parts = []
    if config.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    parts.append(optax.adamw(schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)
