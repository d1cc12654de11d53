"""Named activation points: capture them (`run_with_cache`) or replace them with hooks.

The points, with their shapes (glossary: B batch, T tokens, S keys, D model, N query heads,
K kv heads, H head dim):

    embed                         [B, T, D]  token embeddings (or the inputs_embeds given)
    layers.{i}.resid_pre          [B, T, D]  the layer's input
    layers.{i}.attn.q             [B, T, N, H]  queries, RoPE applied (what attention reads)
    layers.{i}.attn.k             [B, T, K, H]  keys, RoPE applied (what the KV cache stores)
    layers.{i}.attn.v             [B, T, K, H]
    layers.{i}.attn.probs         [B, N, T, S]  softmax(q k^T) (S: the keys attention reads)
    layers.{i}.attn.heads         [B, T, N, H]  each head's output, before o_proj
    layers.{i}.attn_out           [B, T, D]  o_proj's output
    layers.{i}.resid_mid          [B, T, D]  resid_pre + attn_out
    layers.{i}.mlp_out            [B, T, D]
    layers.{i}.resid_post         [B, T, D]  resid_mid + mlp_out: the next layer's resid_pre
    final_norm                    [B, T, D]  the normed states the head reads

A hook is a `Hook(fn, args)`: at its point, the value x becomes `fn(x, args, positions)`, where
`positions` [B, T] are the tokens' positions (-1: padding). `args` is a pytree of arrays that
jit traces, so a new steering vector, scale or mask compiles nothing; `fn` is part of the
compiled program's key, so define it once (the helpers below are module-level functions).
Hooks are keyed by a point's full name, in a dict: {"layers.3.resid_post": add(v)}.

Hooks and captures ride through the layers as `Taps`: a layer with none gets `None` and runs
the program it runs without this module. Asking for a layer's attention probabilities (to
capture or hook them) makes that layer alone take the reference attention, which materialises
[B, N, T, S]; every other point is a value the fast paths compute anyway.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

EMBED, FINAL_NORM = "embed", "final_norm"
LAYER_POINTS = ("resid_pre", "attn.q", "attn.k", "attn.v", "attn.probs", "attn.heads",
                "attn_out", "resid_mid", "mlp_out", "resid_post")
PROBS = "attn.probs"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Hook:
    """x -> fn(x, args, positions) at one point; `args` traced, `fn` static (see module doc).
    The result is cast back to x's dtype, so a hook in fp32 cannot change a bf16 program."""

    fn: Callable[[jax.Array, Any, jax.Array], jax.Array] = dataclasses.field(
        metadata=dict(static=True))
    args: Any = None

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return self.fn(x, self.args, positions).astype(x.dtype)


def _add(x, args, positions):
    vector, scale = args
    return x + scale * vector


def add(vector: Any, scale: float | jax.Array = 1.0) -> Hook:
    """Adds `scale * vector` (broadcast against the point's value, e.g. a [D] steering vector
    at a residual point) at every position. Both are traced: new values compile nothing."""
    return Hook(_add, (jnp.asarray(vector), jnp.asarray(scale, jnp.float32)))


def scale_heads(scales: Any) -> Hook:
    """Multiplies head n's output by scales[n] ([N]; 0 ablates the head). For the
    `attn.heads` point ([B, T, N, H])."""
    return Hook(_scale_heads_bt, jnp.asarray(scales))


def _scale_heads_bt(x, scales, positions):
    return x * scales[:, None].astype(x.dtype)  # [B, T, N, H] * [N, 1]


def _mean_ablate(x, args, positions):
    keep, mean = args  # [N] bool, [N, H]
    return jnp.where(keep[:, None], x, mean.astype(x.dtype))


def mean_ablate(heads: Sequence[int], mean: Any, num_heads: int) -> Hook:
    """Replaces the outputs of `heads` by `mean` ([N, H]: each head's mean output, e.g. over a
    reference batch's `attn.heads`), at the `attn.heads` point."""
    keep = jnp.ones((num_heads,), bool).at[jnp.asarray(list(heads), jnp.int32)].set(False)
    return Hook(_mean_ablate, (keep, jnp.asarray(mean)))


def _patch(x, args, positions):
    values, where = args  # [B, P, ...] or [P, ...] by position; where [B, P] or [P] bool
    if where is None:
        where = jnp.ones(values.shape[:values.ndim - x.ndim + 2], bool)
    if values.ndim < x.ndim:  # the same patch for every row
        values = jnp.broadcast_to(values, x.shape[:1] + values.shape)
        where = jnp.broadcast_to(where, x.shape[:1] + where.shape)
    P = values.shape[1]
    index = jnp.clip(positions, 0, P - 1)  # [B, T]
    take = (positions >= 0) & (positions < P) & jnp.take_along_axis(where, index, axis=1)
    extra = (1,) * (x.ndim - 2)
    new = jnp.take_along_axis(values, index.reshape(index.shape + extra), axis=1)
    return jnp.where(take.reshape(take.shape + extra), new, x)


def patch(values: Any, where: Any | None = None) -> Hook:
    """Activation patching at a [B, T, ...] point: the token at position p takes values[p]
    ([P, ...]: every row), or values[b, p] in row b ([B, P, ...]), where `where` ([P] or
    [B, P] bool; default everywhere the values reach) says so. Indexed by position, not slot,
    so it holds whatever the padding or packing. In generation the rows are the engine's cache
    rows, not your batch: use the [P, ...] form there."""
    return Hook(_patch, (jnp.asarray(values), None if where is None else jnp.asarray(where, bool)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Taps:
    """One layer's (or the model's outer) hooks and the points to capture there, by local name
    ("resid_pre", "attn.probs", ...; "embed" and "final_norm" outside the layers)."""

    hooks: dict[str, Hook]
    capture: tuple[str, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    def wants(self, name: str) -> bool:
        return name in self.hooks or name in self.capture

    def at(self, name: str, x: jax.Array, positions: jax.Array,
           out: dict[str, jax.Array]) -> jax.Array:
        """x after the hook at `name` (if any); recorded in `out` if captured."""
        if name in self.hooks:
            x = self.hooks[name](x, positions)
        if name in self.capture:
            out[name] = x
        return x


def tap(taps: Taps | None, name: str, x: jax.Array, positions: jax.Array,
        out: dict[str, jax.Array]) -> jax.Array:
    return x if taps is None else taps.at(name, x, positions, out)


def wants(taps: Taps | None, name: str) -> bool:
    return taps is not None and taps.wants(name)


def layer_name(i: int, point: str) -> str:
    return f"layers.{i}.{point}"


def check_names(hooks: Mapping[str, Hook], num_layers: int) -> None:
    for name, hook in hooks.items():
        if not isinstance(hook, Hook):
            raise TypeError(f"hook {name!r} must be a phi3_jax.hooks.Hook, got "
                            f"{type(hook).__name__}")
        _split_name(name, num_layers)


def _split_name(name: str, num_layers: int) -> tuple[int | None, str]:
    if name in (EMBED, FINAL_NORM):
        return None, name
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() \
            and parts[2] in LAYER_POINTS:
        i = int(parts[1])
        if i < num_layers:
            return i, parts[2]
        raise ValueError(f"{name!r}: the model has {num_layers} layers")
    raise ValueError(f"unknown hook point {name!r}; points are {EMBED!r}, {FINAL_NORM!r} and "
                     f"layers.<i>.<point> for <point> in {LAYER_POINTS}")


def capture_names(num_layers: int, names: Sequence[str] | None = None,
                  layers: Sequence[int] | None = None) -> tuple[str, ...]:
    """Full point names for run_with_cache's `names` (local or full names; None: every point
    except attention probabilities, which change the attention path) and `layers` (None:
    all)."""
    layers = range(num_layers) if layers is None else [_layer_index(i, num_layers)
                                                       for i in layers]
    if names is None:
        names = (EMBED, *(p for p in LAYER_POINTS if p != PROBS), FINAL_NORM)
    if isinstance(names, str):
        names = (names,)
    out = []
    for name in names:
        if name in LAYER_POINTS:
            out.extend(layer_name(i, name) for i in layers)
        else:
            _split_name(name, num_layers)
            out.append(name)
    return tuple(dict.fromkeys(out))


def _layer_index(i: int, num_layers: int) -> int:
    if not -num_layers <= i < num_layers:
        raise ValueError(f"layer {i} out of range for {num_layers} layers")
    return i % num_layers


def split_taps(num_layers: int, hooks: Mapping[str, Hook] | None,
               capture: Sequence[str] = ()) -> tuple[Taps | None, list[Taps | None]]:
    """(outer Taps, one Taps or None per layer) for full-name hooks and captures."""
    hooks = dict(hooks or {})
    check_names(hooks, num_layers)
    outer: dict[str, Hook] = {}
    per_layer: list[dict[str, Hook]] = [{} for _ in range(num_layers)]
    for name, hook in hooks.items():
        i, point = _split_name(name, num_layers)
        (outer if i is None else per_layer[i])[point] = hook
    outer_capture: list[str] = []
    layer_capture: list[list[str]] = [[] for _ in range(num_layers)]
    for name in capture:
        i, point = _split_name(name, num_layers)
        (outer_capture if i is None else layer_capture[i]).append(point)

    def make(h, c):
        return Taps(h, tuple(c)) if h or c else None

    return (make(outer, outer_capture),
            [make(h, c) for h, c in zip(per_layer, layer_capture, strict=True)])


def full_names(outer: dict[str, jax.Array], layers: list[dict[str, jax.Array]],
               ) -> dict[str, jax.Array]:
    """The captured values under their full names."""
    out = dict(outer)
    for i, got in enumerate(layers):
        out.update({layer_name(i, k): v for k, v in got.items()})
    return out
