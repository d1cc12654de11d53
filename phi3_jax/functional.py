"""The model as pure functions of its parameters, for your own `jit`, `vmap` and `grad`.

    graphdef, params = model.graphdef, model.params        # a loaded phi3_jax.Phi3
    logits = forward(params, graphdef, tokens, attention_mask=mask)
    f = jax.jit(forward, static_argnums=1)                  # graphdefs hash: a static argument
    grads = jax.grad(lambda e: forward(params, graphdef, inputs_embeds=e).sum())(embeds)

Both functions run the reference layout: every row as given, padded anywhere, attention through
dot_product_attention ([B, N, T, T] scores), so they suit research batches; long rows go through
`Phi3.logits`, which packs them for the prefill kernels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from phi3_jax.hooks import Hook


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """[B, T] int32 positions from a [B, T] mask (1 = token): each token's rank among its row's
    tokens, -1 at padding, so left-, right- or middle-padded rows get the positions they would
    have alone."""
    mask = jnp.asarray(attention_mask).astype(bool)
    return jnp.where(mask, jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, -1)


def _positions(tokens, inputs_embeds, positions, attention_mask):
    if (tokens is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of tokens and inputs_embeds")
    if positions is not None and attention_mask is not None:
        raise ValueError("give positions or attention_mask, not both")
    if positions is not None:
        return jnp.asarray(positions, jnp.int32)
    shape = (tokens if tokens is not None else inputs_embeds).shape[:2]
    return positions_from_mask(jnp.ones(shape, bool) if attention_mask is None
                               else attention_mask)


def run_with_cache(params: nnx.State, graphdef: nnx.GraphDef, tokens: jax.Array | None = None,
                   *, inputs_embeds: jax.Array | None = None,
                   positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
                   hooks: Mapping[str, Hook] | None = None, capture: Sequence[str] = (),
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(logits [B, T, V], {point name: value}) for the `capture` points (phi3_jax.hooks).

    tokens [B, T] int, or inputs_embeds [B, T, D]. positions [B, T] (-1: padding) default to
    those of `attention_mask` (1 = token; default all ones). `hooks` replace values at named
    points. Pure: differentiable in params and inputs_embeds, and jittable with graphdef
    static (the capture names must be static too).
    """
    positions = _positions(tokens, inputs_embeds, positions, attention_mask)
    model = nnx.merge(graphdef, params)
    x, _, captured = model.activations(tokens, positions, inputs_embeds=inputs_embeds,
                                       hooks=hooks, capture=tuple(capture))
    return model.head.attend(x), captured


def forward(params: nnx.State, graphdef: nnx.GraphDef, tokens: jax.Array | None = None, *,
            inputs_embeds: jax.Array | None = None, positions: jax.Array | None = None,
            attention_mask: jax.Array | None = None,
            hooks: Mapping[str, Hook] | None = None) -> jax.Array:
    """Logits [B, T, V]; the arguments as in run_with_cache."""
    return run_with_cache(params, graphdef, tokens, inputs_embeds=inputs_embeds,
                          positions=positions, attention_mask=attention_mask, hooks=hooks)[0]
