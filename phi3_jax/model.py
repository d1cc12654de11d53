"""The Phi-3 decoder (Phi3ForCausalLM) as Flax NNX modules.

Notable features, all from the reference (spec sections 1-3):
- pre-norm layers with two residual adds; RMSNorm computed in fp32;
- fused qkv (GQA) and gate_up projections, no biases anywhere;
- half-split RoPE with partial rotary and LongRoPE (short/long factors chosen per row);
- an optional sliding window; a tied or untied head.

Module and parameter names mirror the checkpoint's (`model.layers.3.self_attn.qkv_proj.weight`),
so the converter is a short table of layout changes, not a renaming scheme.

Einsum glossary: B batch, T query length, S key length, D model, N query heads, K kv heads,
G query heads per kv head, H head dim, F ffn, V vocab, C the gate/up pair.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from phi3_jax import quantize
from phi3_jax.attention import Attention, Kernels, attention_mask, choose_kernels
from phi3_jax.cache import CacheUpdate, KVCache
from phi3_jax.cache import key_positions as cache_key_positions
from phi3_jax.config import Phi3Config
from phi3_jax.hooks import FINAL_NORM, Hook, full_names, split_taps, tap
from phi3_jax.mlp import MLP
from phi3_jax.norm import RMSNorm
from phi3_jax.params import param
from phi3_jax.rope import rotary_tables, uses_long_factors


class Embedding(nnx.Module):
    """The [V, D] token table; also the head (`attend`), tied or not, in the checkpoint's layout."""

    def __init__(self, config: Phi3Config, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.weight = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"),
                            dtype)
        self.quant = None  # a phi3_jax.quantize.Layout once quantized (then also `scale`)

    def __call__(self, tokens: jax.Array, dtype: jnp.dtype | None = None,
                 ) -> jax.Array:  # [B, T] -> [B, T, D]
        if self.quant is not None:
            return quantize.lookup(tokens, self.weight[...], self.scale[...], self.quant, dtype)
        return jnp.take(self.weight[...], tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, V]
        if self.quant is not None:
            return quantize.attend(x, self.weight[...], self.scale[...], self.quant)
        return jnp.einsum("BTD,VD->BTV", x, self.weight[...])


class DecoderLayer(nnx.Module):
    def __init__(self, config: Phi3Config, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, cos, sin, mask, kv=None, update=None, lengths=None, paths=None,
                 taps=None, positions=None):
        """(x, kv, captured): `taps` (phi3_jax.hooks.Taps or None) hooks and captures this
        layer's points at the tokens' `positions`; captured maps local point names to values."""
        captured = {}
        x = tap(taps, "resid_pre", x, positions, captured)
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, update, lengths,
                               paths, taps, positions, captured)
        h = tap(taps, "attn_out", h, positions, captured)
        x = tap(taps, "resid_mid", x + h, positions, captured)
        h = tap(taps, "mlp_out", self.mlp(self.post_attention_layernorm(x)), positions,
                captured)
        x = tap(taps, "resid_post", x + h, positions, captured)
        return x, kv, captured


def _layer(graphdef, state, x, cos, sin, mask, kv, update, lengths, paths, taps, positions):
    return nnx.merge(graphdef, state)(x, cos, sin, mask, kv, update, lengths, paths, taps,
                                      positions)


# Every layer has the same graphdef and input shapes, so jax traces a model call's layer once
# instead of once per layer. A warm start from the persistent cache still traces and lowers every
# program (the cache key hashes the lowered module): for Phi-3-mini's 10-program workload that
# host time fell from 3.60 to 2.08 s (tracing 2.51 -> 0.96 s; bench_compile.py --trace-only, CPU).
# inline=True puts the traced layer back into the caller's jaxpr, so XLA compiles exactly the
# program of the unrolled loop (compiled HLO compared); an out-of-line call would also share the
# lowering, but it changed XLA's fusions at the layer boundaries.
_traced_once_layer = jax.jit(_layer, static_argnames=("graphdef", "paths"), inline=True)
# Training option: recompute each layer's activations in the backward pass.
_remat_layer = jax.checkpoint(_traced_once_layer, static_argnums=(0, 9))


class Phi3Model(nnx.Module):
    def __init__(self, config: Phi3Config, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(config, dtype, rngs)
        self.layers = nnx.List([DecoderLayer(config, dtype, rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class Phi3ForCausalLM(nnx.Module):
    def __init__(self, config: Phi3Config, *, dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs | None = None, remat: bool = False,
                 kernels: Kernels | None = None,
                 quantization: quantize.Quantization | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        # The attention computations (static, in the graphdef): chosen once, never per call.
        self.kernels = kernels if kernels is not None else choose_kernels("auto", dtype)
        # Training option: recompute each layer's activations in the backward pass instead of
        # storing them (memory for compute). A static attribute, so it lives in the graphdef.
        self.remat = remat
        self.model = Phi3Model(config, dtype, rngs)
        if not config.tie_word_embeddings:
            self.lm_head = Embedding(config, dtype, rngs)
        self.quantization = quantization  # static: weight-only, activations stay in `dtype`
        if quantization is not None:
            quantize.quantize_model(self, quantization, self.kernels.quantized_matmul)

    @property
    def head(self) -> Embedding:
        return self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head

    def hidden_states(self, tokens: jax.Array | None, positions: jax.Array,
                      cache: KVCache | None = None, update: CacheUpdate | None = None,
                      use_long: jax.Array | None = None,
                      prefill_lengths: jax.Array | None = None, *,
                      inputs_embeds: jax.Array | None = None,
                      hooks: Mapping[str, Hook] | None = None,
                      ) -> tuple[jax.Array, KVCache | None]:
        """The final normed hidden states [B, T, D]; see `activations` for the arguments."""
        x, cache, _ = self.activations(tokens, positions, cache, update, use_long,
                                       prefill_lengths, inputs_embeds=inputs_embeds,
                                       hooks=hooks)
        return x, cache

    def activations(self, tokens: jax.Array | None, positions: jax.Array,
                    cache: KVCache | None = None, update: CacheUpdate | None = None,
                    use_long: jax.Array | None = None,
                    prefill_lengths: jax.Array | None = None, *,
                    inputs_embeds: jax.Array | None = None,
                    hooks: Mapping[str, Hook] | None = None, capture: Sequence[str] = (),
                    ) -> tuple[jax.Array, KVCache | None, dict[str, jax.Array]]:
        """(final normed hidden states [B, T, D], cache, captured); see __call__ for tokens,
        positions, cache, update and use_long.

        `prefill_lengths` [B] declares right-padded rows (row b's positions are 0..len-1 at its
        first len slots, then -1), with no cache or an update that reads no cache (a prompt's
        first chunk): attention then reads only these tokens, through the fused causal kernel
        or the blocked attention where one applies.
        `inputs_embeds` [B, T, D] replaces the token embeddings (tokens is then ignored).
        `hooks` ({point name: phi3_jax.hooks.Hook}) replace values at named points and
        `capture` (point names) returns them in `captured`, keyed by name; see phi3_jax.hooks.
        Layers with neither run exactly the program they run without them.
        """
        config = self.config
        if use_long is None:
            # A row's length is its largest position + 1 (positions are per row, so padding
            # does not count), the quantity the reference compares with original_max.
            use_long = uses_long_factors(config, jnp.max(positions, axis=1) + 1)
        outer, layer_taps = split_taps(config.num_hidden_layers, hooks, capture)
        outer_captured: dict[str, jax.Array] = {}
        if inputs_embeds is None:
            x = self.model.embed_tokens(tokens, self.model.norm.weight.dtype)
        else:
            x = inputs_embeds
        x = tap(outer, "embed", x, positions, outer_captured)  # [B, T, D]
        cos, sin = rotary_tables(config, positions, use_long, x.dtype)
        if cache is not None and update.read_len > 0:
            keys = cache_key_positions(update, x.shape[0])  # [B, read_len]
            mask = attention_mask(positions, keys, config.sliding_window)
        else:
            mask = attention_mask(positions, positions, config.sliding_window)
        paths = self.kernels
        call = _remat_layer if self.remat and cache is None else _traced_once_layer
        new_k, new_v, layer_captured = [], [], []
        for i, layer in enumerate(self.model.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            taps = layer_taps[i]
            x, kv, got = call(*nnx.split(layer), x, cos, sin, mask, kv, update,
                              prefill_lengths, paths, taps, None if taps is None else positions)
            layer_captured.append(got)
            if kv is not None:
                if x.shape[1] > 1:
                    # The next layer waits for this layer's cache write. Unforced, XLA's GPU
                    # scheduler left every layer's write to the end of a prefill, holding all
                    # layers' keys and values at once: 22-30 KiB of temporaries per token per
                    # layer for Phi-3-mini against 8 with the barrier (H100), and 138 GiB
                    # asked for a 100k-token prompt (benchmarks/prefill_memory.py).
                    x, kv = jax.lax.optimization_barrier((x, kv))
                new_k.append(kv[0])
                new_v.append(kv[1])
        x = tap(outer, FINAL_NORM, self.model.norm(x), positions, outer_captured)
        if cache is not None:
            cache = KVCache(k=tuple(new_k), v=tuple(new_v))
        return x, cache, full_names(outer_captured, layer_captured)

    def __call__(self, tokens: jax.Array | None, positions: jax.Array,
                 cache: KVCache | None = None, update: CacheUpdate | None = None,
                 use_long: jax.Array | None = None, *,
                 inputs_embeds: jax.Array | None = None,
                 hooks: Mapping[str, Hook] | None = None,
                 ) -> tuple[jax.Array, KVCache | None]:
        """(logits [B, T, V], cache) for token ids [B, T] (or inputs_embeds [B, T, D]) at
        per-row positions [B, T] (-1 = padding).

        Without a cache, the T tokens attend to each other (masked by their positions). With a
        cache, `update` (a phi3_jax.cache.CacheUpdate) says where the new tokens' keys and
        values go and which cached slots they attend to; the updated cache is returned.
        `use_long` [B] overrides the per-row LongRoPE choice (the "always long" policy, or a
        prompt chunk whose whole prompt decides it). `hooks`: see phi3_jax.hooks.
        For a pure function of the parameters, see phi3_jax.functional.forward.
        """
        x, cache = self.hidden_states(tokens, positions, cache, update, use_long,
                                      inputs_embeds=inputs_embeds, hooks=hooks)
        logits = self.head.attend(x)
        return logits, cache


def abstract_model(config: Phi3Config, dtype: jnp.dtype = jnp.float32,
                   kernels: Kernels | None = None,
                   quantization: quantize.Quantization | None = None,
                   ) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its parameters as ShapeDtypeStructs, allocating nothing."""
    model = nnx.eval_shape(lambda: Phi3ForCausalLM(config, dtype=jnp.dtype(dtype),
                                                   rngs=nnx.Rngs(0), kernels=kernels,
                                                   quantization=quantization))
    return nnx.split(model)
