"""LoRA adapters on the serving model's own projections, and their merge back into the weights.

A LoRA projection is the same `Einsum` (same weight, same path, same logical axes) plus two
factors: A over the weight's contracted axes and B over its output axes, joined by the rank axis
R. The low-rank path runs beside the frozen weight, `y = x W + (alpha / r) (x A) B`, so training
never forms a full-size weight gradient. Merging folds `(alpha / r) A B` into W in our layout;
the layouts' converters are linear, so the merged HF tensor is the HF tensor of the merged weight.

Parameter paths: `...qkv_proj.weight` (frozen, nnx.Param), `...qkv_proj.lora_a` and
`...qkv_proj.lora_b` (LoRAParam). B starts at zero, so an adapted model starts equal to its base.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from phi3_jax.params import Einsum

# The projections of a Phi-3 layer, by attribute name.
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
RANK_LETTER = "R"  # not in the einsum glossary, so it cannot collide with a weight axis


class LoRAParam(nnx.Variable):
    """A trainable low-rank factor (a Variable type of its own, so filters can split it out)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        unknown = set(self.targets) - set(TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {sorted(unknown) or '(none)'} are not projections "
                             f"of a Phi-3 layer; choose from {', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _split_spec(spec: str) -> tuple[str, str, str, str, str]:
    """'BTD,DKCH->BTKCH' -> (x, w, out, contracted 'D', weight's output letters 'KCH')."""
    inputs, out = spec.split("->")
    x, w = inputs.split(",")
    contracted = "".join(c for c in w if c in x and c not in out)
    w_out = "".join(c for c in w if c in out)
    if RANK_LETTER in spec or contracted + w_out != w:
        raise ValueError(f"einsum {spec!r} is not a plain projection LoRA can adapt")
    return x, w, out, contracted, w_out


class LoRAEinsum(Einsum):
    """An `Einsum` with a low-rank update beside its (frozen) weight."""

    def __init__(self, base: Einsum, rank: int, alpha: float, key: jax.Array):
        x, w, out, contracted, w_out = _split_spec(base.spec)
        self.spec = base.spec
        self.weight = base.weight
        self.quant = base.quant  # QLoRA: the frozen base may be quantized (phi3_jax.quantize)
        if base.quant is not None:
            self.scale = base.scale
        self.lora_scale = alpha / rank
        self._spec_a = f"{x},{contracted}{RANK_LETTER}->" + "".join(
            c for c in x if c not in contracted) + RANK_LETTER
        self._spec_b = ("".join(c for c in x if c not in contracted) + RANK_LETTER
                        + f",{RANK_LETTER}{w_out}->{out}")
        self._spec_merge = f"{contracted}{RANK_LETTER},{RANK_LETTER}{w_out}->{w}"
        shape = dict(zip(w, base.dense_shape, strict=True))
        axes = dict(zip(w, base.dense_axes, strict=True))
        in_shape = [shape[c] for c in contracted]
        # A like a fan-in-scaled dense init, B zero: the adapter starts as the identity update.
        std = 1.0 / math.sqrt(math.prod(in_shape))
        a = std * jax.random.normal(key, (*in_shape, rank), jnp.float32)
        self.lora_a = LoRAParam(a, logical_axes=(*(axes[c] for c in contracted), None))
        self.lora_b = LoRAParam(jnp.zeros((rank, *(shape[c] for c in w_out)), jnp.float32),
                                logical_axes=(None, *(axes[c] for c in w_out)))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)  # the frozen projection, quantized or not
        a = self.lora_a[...].astype(x.dtype)
        b = self.lora_b[...].astype(x.dtype)
        low = jnp.einsum(self._spec_a, x, a)  # [..., R]
        return y + self.lora_scale * jnp.einsum(self._spec_b, low, b)

    def delta(self) -> jax.Array:
        """(alpha / r) A B in the weight's layout, fp32."""
        return self.lora_scale * jnp.einsum(self._spec_merge, self.lora_a[...].astype(jnp.float32),
                                       self.lora_b[...].astype(jnp.float32))


def add_lora(model: nnx.Module, config: LoRAConfig, seed: int = 0) -> nnx.Module:
    """Replaces the target projections of every layer by LoRA projections (in place); returns it.

    Done once, on a freshly built (usually abstract) model, before it is split for training.
    """
    key = jax.random.key(seed)
    for i, layer in enumerate(model.model.layers):
        for owner in (layer.self_attn, layer.mlp):
            for name in config.targets:
                base = getattr(owner, name, None)
                if isinstance(base, Einsum):
                    setattr(owner, name, LoRAEinsum(base, config.rank, config.alpha,
                                                    jax.random.fold_in(key, len(TARGETS) * i
                                                                       + TARGETS.index(name))))
    return model


def merge_lora(params: dict, lora: dict, config: LoRAConfig) -> dict:
    """Base params (pure dict) with every adapter folded in: W + (alpha / r) A B, in W's dtype.

    `lora` is the pure dict of LoRA factors (paths ending in lora_a / lora_b). The sum is taken
    in fp32 and rounded once to the weight's dtype.
    """
    flat = dict(_flatten(params))
    for path, a in _flatten(lora):
        if path[-1] != "lora_a":
            continue
        owner = path[:-1]
        b = _get(lora, (*owner, "lora_b"))
        w = flat[(*owner, "weight")]
        letters = "abcdefghijklmnopq"
        n_in = a.ndim - 1
        spec = (f"{letters[:n_in]}z,z{letters[n_in:n_in + b.ndim - 1]}->"
                f"{letters[:n_in + b.ndim - 1]}")
        delta = config.scale * np.einsum(spec, np.asarray(a, np.float32),
                                         np.asarray(b, np.float32))
        # The weight's axes are the contracted ones then the output ones for every Phi-3
        # projection (D|KCH, NH|D, D|CF, F|D), which is the order `spec` produces.
        merged = np.asarray(w, np.float32) + delta.reshape(w.shape)
        flat[(*owner, "weight")] = merged.astype(np.asarray(w).dtype)
    return _unflatten(flat)


def _flatten(tree: dict, prefix: tuple = ()) -> list[tuple[tuple, object]]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _flatten(v, (*prefix, k))
        else:
            out.append(((*prefix, k), v))
    return out


def _unflatten(flat: dict) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _get(tree: dict, path: tuple) -> object:
    for k in path:
        tree = tree[k]
    return tree
