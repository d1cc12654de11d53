"""Weight-only quantization: int8 per output channel, int4 in groups along the input; symmetric.

Which weights: the four projections of every layer (qkv, o_proj, gate_up, down), and with
`embeddings=True` the embedding table and head. Activations, norms and the KV cache keep the
model's dtype.

Layouts. A projection's dense weight has its contracted (input) axes first, then its output axes
(qkv [D | K, G+2, H], o_proj [N, H | D], gate_up [D | 2, F], down [F | D]); In is the product
of the input axes, O of the output axes.
- int8: `weight` int8 in the dense layout, `scale` [*out]: one scale per output channel.
- int4: `weight` uint8 [In/g, g/2, *out], `scale` [In/g, *out]: groups of g input rows (groups
  run across o_proj's heads: Phi-3-mini's head dim 96 holds no group of 128). Byte r of a group
  holds row r in its low nibble and row r + g/2 in its high nibble, so each nibble plane is a
  contiguous half of the group that multiplies a contiguous half of x (an interleaved layout,
  rows 2r and 2r+1, made the CPU decode slower than bf16).
- The embedding [V, D] contracts its last axis in the head: int8 `scale` [V]; int4 `weight`
  uint8 [V, D/g, g/2] and `scale` [V, D/g].
Sharding: the group axis carries the name of the input axis it replaces ("mlp" for down's F/g),
so the rules table splits whole groups; a scale carries its weight's names.

Symmetric (w = q * s, q in [-127, 127] or [-7, 7]): no zero point to store or to subtract, so
dequantization is one multiply that fuses into the matmul, zero is exact, and the weights are
centred on zero anyway. Scales are bf16, rounded up so no weight clips: fp32 scales would put
Phi-3-mini's int4 weights over the 2.3 GB budget.

The matmul (one choice per model, `Kernels.quantized_matmul`, next to the attention paths):
- "blocked" (CPU, one device): a loop over blocks of input rows, each dequantized into a small
  fp32 tile and multiplied in; no full-size weight is ever built and the sums are fp32. int4
  multiplies each half of a group by its half of x, so no tile is ever concatenated. Phi-3-mini's
  gate_up at batch 1 on 2 shared CPU cores: bf16 583 ms (XLA's CPU dot converts the whole bf16
  weight), int8 21 ms, int4 33 ms (188 ms when the halves were concatenated first).
- "xla" (GPUs, TPUs, meshes): the whole weight dequantized in the activation dtype and one
  einsum; XLA fuses the convert into the dot where the backend can, and GSPMD partitions it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("int8", "int4")
MATMULS = ("blocked", "xla")
QMAX = {"int8": 127, "int4": 7}
SCALE_DTYPE = jnp.bfloat16
TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# fp32 bytes of one dequantized tile of the blocked matmul: small enough to stay in cache.
BLOCK_BYTES = 2**21


@dataclasses.dataclass(frozen=True)
class Quantization:
    """What to quantize and how: `scheme` "int8" or "int4", int4's `group_size` (input rows per
    scale), and whether the embedding table and head are quantized too."""

    scheme: str
    group_size: int = 128
    embeddings: bool = False

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; choose from "
                             f"{', '.join(SCHEMES)}")
        if (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                or self.group_size < 2 or self.group_size % 2):
            raise ValueError(f"group size must be an even integer >= 2, got "
                             f"{self.group_size!r}")

    def to_json(self) -> dict[str, Any]:
        return {"scheme": self.scheme, "group_size": self.group_size,
                "embeddings": self.embeddings}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Quantization:
        return cls(record["scheme"], int(record["group_size"]), bool(record["embeddings"]))


def resolve(scheme: str | Quantization | None, group_size: int = 128,
            embeddings: bool = False) -> Quantization | None:
    """A Quantization from the `load`/CLI arguments (None: no quantization)."""
    if scheme is None or isinstance(scheme, Quantization):
        return scheme
    return Quantization(scheme, group_size, embeddings)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one weight is stored: static, carried in the module (and so in the graph).

    shape/axes: the dense weight's; n_in: its leading contracted axes (0 for the embedding,
    whose contracted axis D is its last); matmul: "blocked" or "xla"."""

    scheme: str
    group_size: int
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    n_in: int
    matmul: str = "xla"

    @property
    def embedding(self) -> bool:
        return self.n_in == 0

    @property
    def rows(self) -> int:  # In: the contracted length
        return self.shape[-1] if self.embedding else math.prod(self.shape[:self.n_in])

    @property
    def groups(self) -> int:
        return self.rows // self.group_size

    def stored(self) -> tuple[tuple[tuple[int, ...], Any, tuple], tuple[tuple[int, ...], tuple]]:
        """((weight shape, dtype, axes), (scale shape, axes))."""
        g, shape, axes = self.group_size, self.shape, self.axes
        if self.embedding:  # [V, D]
            if self.scheme == "int8":
                return (shape, jnp.int8, axes), (shape[:1], axes[:1])
            return (((shape[0], self.groups, g // 2), jnp.uint8, (*axes, None)),
                    ((shape[0], self.groups), axes))
        out, out_axes = shape[self.n_in:], axes[self.n_in:]
        if self.scheme == "int8":
            return (shape, jnp.int8, axes), (out, out_axes)
        group_axis = axes[0]
        return (((self.groups, g // 2, *out), jnp.uint8, (group_axis, None, *out_axes)),
                ((self.groups, *out), (group_axis, *out_axes)))


def layout_for(quantization: Quantization, shape: tuple[int, ...],
               axes: tuple[str | None, ...], n_in: int, matmul: str, name: str) -> Layout:
    """The Layout of a weight, refusing a group size that does not divide its input rows."""
    layout = Layout(quantization.scheme, quantization.group_size, tuple(shape), tuple(axes),
                    n_in, matmul)
    if layout.scheme == "int4" and layout.rows % layout.group_size:
        raise ValueError(f"group size {layout.group_size} does not divide the input dimension "
                         f"{layout.rows} of {name}; choose a divisor of {layout.rows}")
    return layout


# ---------------------------------------------------------------------------- the numbers
# Host (numpy) or device (jax) arrays alike: `xp` is whichever module the input belongs to.

def _xp(x: Any) -> Any:
    return np if isinstance(x, np.ndarray) else jnp


def _scale(absmax: Any, qmax: int) -> Any:
    """absmax / qmax in bf16, rounded up (so |w| / scale <= qmax: nothing clips); 1 for an
    all-zero group (its weights quantize to 0 whatever the scale)."""
    xp = _xp(absmax)
    exact = xp.where(absmax > 0, absmax / qmax, 1).astype(np.float32)
    scale = exact.astype(SCALE_DTYPE)
    # bf16's relative spacing is at most 2^-7, so this lands on the next value up.
    return xp.where(scale.astype(np.float32) < exact,
                    (exact * (1 + 2.0**-7)).astype(SCALE_DTYPE), scale)


def quantize(w: Any, layout: Layout) -> tuple[Any, Any]:
    """(weight, scale) of a dense weight in `layout` (numpy in, numpy out; jax likewise)."""
    xp = _xp(w)
    w = w.astype(np.float32)
    if layout.embedding:  # quantize the transpose [D, V]: V are its output channels
        q, s = quantize(w.T, dataclasses.replace(layout, shape=layout.shape[::-1], n_in=1))
        return (q.T if layout.scheme == "int8" else xp.transpose(q, (2, 0, 1))), s.T
    qmax, rows = QMAX[layout.scheme], layout.rows
    out = layout.shape[layout.n_in:]
    w = w.reshape(rows, -1)  # [In, O]
    if layout.scheme == "int8":
        s = _scale(xp.max(xp.abs(w), axis=0), qmax)  # [O]
        q = xp.clip(xp.round(w / s.astype(np.float32)), -qmax, qmax).astype(np.int8)
        return q.reshape(layout.shape), s.reshape(out)
    g = layout.group_size
    w = w.reshape(rows // g, g, -1)  # [In/g, g, O]
    s = _scale(xp.max(xp.abs(w), axis=1), qmax)  # [In/g, O]
    q = xp.clip(xp.round(w / s[:, None].astype(np.float32)), -qmax, qmax)
    nibbles = (q + 8).astype(np.uint8)
    packed = nibbles[:, :g // 2] | (nibbles[:, g // 2:] << 4)  # [In/g, g/2, O]
    return packed.reshape(rows // g, g // 2, *out), s.reshape(rows // g, *out)


def _unpack(packed: Any, axis: int) -> Any:
    """int4 codes as int8: the low nibbles (first half of each group), then the high ones."""
    xp = _xp(packed)
    low = (packed & 15).astype(np.int8) - 8
    high = (packed >> 4).astype(np.int8) - 8
    return xp.concatenate([low, high], axis=axis)


def dequantize(weight: Any, scale: Any, layout: Layout, dtype: Any = np.float32) -> Any:
    """The dense weight (in `dtype`) that a stored (weight, scale) pair stands for."""
    f32 = np.float32
    if layout.embedding:
        if layout.scheme == "int8":
            return (weight.astype(f32) * scale.astype(f32)[:, None]).astype(dtype)
        w = _unpack(weight, axis=-1).astype(f32) * scale.astype(f32)[..., None]
        return w.reshape(layout.shape).astype(dtype)
    if layout.scheme == "int8":
        return (weight.astype(f32) * scale.astype(f32)).astype(dtype)
    w = _unpack(weight, axis=1).astype(f32) * scale.astype(f32)[:, None]
    return w.reshape(layout.shape).astype(dtype)


# ---------------------------------------------------------------------------- the matmuls

def _block_count(n: int, unit_bytes: int) -> int:
    """How many blocks to cut n units into: the fewest that keep a block within BLOCK_BYTES
    (one unit when a unit alone exceeds it), and that divide n."""
    per_block = max(1, min(n, BLOCK_BYTES // max(unit_bytes, 1)))
    while n % per_block:
        per_block -= 1
    return n // per_block


def project(spec: str, x: jax.Array, weight: jax.Array, scale: jax.Array,
            layout: Layout) -> jax.Array:
    """einsum(spec, x, dense weight) for a quantized projection: x [..., *in] -> [..., *out]."""
    if layout.matmul == "xla":
        w = dequantize(weight, scale, layout, x.dtype)
        return jnp.einsum(spec, x, w)
    out = layout.shape[layout.n_in:]
    batch = x.shape[:x.ndim - layout.n_in]
    x2 = x.reshape(-1, layout.rows).astype(jnp.float32)  # [M, In]
    M, O = x2.shape[0], math.prod(out)
    if layout.scheme == "int8":  # the per-channel scale once, after the sum
        n = _block_count(layout.rows, 4 * O)
        q = weight.reshape(n, -1, O)  # [n, In / n, O]
        x3 = x2.reshape(M, n, -1)

        def rows(i, acc):
            return acc + jnp.dot(x3[:, i], q[i].astype(jnp.float32),
                                 preferred_element_type=jnp.float32)

        y = jax.lax.fori_loop(0, n, rows, jnp.zeros((M, O), jnp.float32))
        y = y * scale.reshape(O).astype(jnp.float32)
    else:
        # Each half of a group multiplies its own half of x: concatenating the unpacked halves
        # first made the CPU step ~5x slower (an extra copy of every tile, badly vectorised).
        g = layout.group_size
        n = _block_count(layout.groups, 4 * g * O)
        q = weight.reshape(n, -1, g // 2, O)  # [n, groups per block, g/2, O]
        s = scale.reshape(n, -1, 1, O)
        x4 = x2.reshape(M, n, -1, 2, g // 2)  # [M, n, k, half, g/2]

        def block(i, acc):
            low, high = _halves(q[i], s[i])  # [k, g/2, O] each, fp32
            xi = x4[:, i]  # [M, k, 2, g/2]
            return (acc + jnp.einsum("Mkh,khO->MO", xi[:, :, 0], low)
                    + jnp.einsum("Mkh,khO->MO", xi[:, :, 1], high))

        y = jax.lax.fori_loop(0, n, block, jnp.zeros((M, O), jnp.float32))
    return y.astype(x.dtype).reshape(*batch, *out)


def _halves(packed: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The two halves of int4 groups, dequantized in fp32: (low nibbles, high nibbles) * scale
    (scale broadcasts against the packed codes)."""
    scale = scale.astype(jnp.float32)
    low = ((packed & 15).astype(jnp.int8) - 8).astype(jnp.float32) * scale
    high = ((packed >> 4).astype(jnp.int8) - 8).astype(jnp.float32) * scale
    return low, high


def attend(x: jax.Array, weight: jax.Array, scale: jax.Array, layout: Layout) -> jax.Array:
    """The head on a quantized embedding: [B, T, D] -> [B, T, V]."""
    if layout.matmul == "xla":
        return jnp.einsum("BTD,VD->BTV", x, dequantize(weight, scale, layout, x.dtype))
    B, T, D = x.shape
    V = layout.shape[0]
    x2 = x.reshape(B * T, D).astype(jnp.float32)
    n = _block_count(V, 4 * D)
    blocks = (weight.reshape(n, V // n, *weight.shape[1:]),
              scale.reshape(n, V // n, *scale.shape[1:]))
    block_layout = dataclasses.replace(layout, shape=(V // n, D))

    def one(block):  # [M, V / n]: this block of vocabulary rows, dequantized in fp32
        if layout.scheme == "int8":
            return jnp.dot(x2, dequantize(*block, block_layout).T,
                           preferred_element_type=jnp.float32)
        low, high = _halves(block[0], block[1][..., None])  # [V / n, D / g, g / 2] each
        x4 = x2.reshape(x2.shape[0], -1, 2, layout.group_size // 2)  # [M, D / g, 2, g / 2]
        return (jnp.einsum("Mkh,Vkh->MV", x4[:, :, 0], low)
                + jnp.einsum("Mkh,Vkh->MV", x4[:, :, 1], high))

    y = jax.lax.map(one, blocks)  # [n, M, V / n]
    return jnp.moveaxis(y, 0, 1).reshape(B, T, V).astype(x.dtype)


def lookup(tokens: jax.Array, weight: jax.Array, scale: jax.Array, layout: Layout,
           dtype: Any) -> jax.Array:
    """Embedding rows of a quantized table: [B, T] -> [B, T, D] in `dtype`."""
    rows = dataclasses.replace(layout, shape=(math.prod(tokens.shape), layout.shape[1]))
    w = dequantize(jnp.take(weight, tokens.reshape(-1), axis=0),
                   jnp.take(scale, tokens.reshape(-1), axis=0), rows, dtype)
    return w.reshape(*tokens.shape, layout.shape[1])


# ---------------------------------------------------------------------------- modules

def quantize_module(module: Any, quantization: Quantization, n_in: int, matmul: str,
                    name: str) -> None:
    """Replaces a module's dense `weight` (an Einsum or the Embedding) by its quantized weight
    and `scale`, and records the Layout in `module.quant` (in place). Works on abstract models
    (under nnx.eval_shape) and concrete ones alike."""
    if getattr(module, "quant", None) is not None:
        raise ValueError(f"{name} is already quantized ({module.quant.scheme}); quantize a "
                         f"dense model")
    from flax import nnx

    var = module.weight
    layout = layout_for(quantization, tuple(var.shape), var.get_metadata()["logical_axes"],
                        n_in, matmul, name)
    (_, _, weight_axes), (_, scale_axes) = layout.stored()
    weight, scale = quantize(var[...], layout)
    module.weight = nnx.Param(weight, logical_axes=weight_axes)
    module.scale = nnx.Param(scale, logical_axes=scale_axes)
    module.quant = layout


def quantize_model(model: Any, quantization: Quantization, matmul: str) -> Any:
    """Quantizes a Phi3ForCausalLM's projections (and embeddings if asked) in place; returns
    it."""
    if matmul not in MATMULS:
        raise ValueError(f"quantized matmul must be one of {MATMULS}, got {matmul!r}")
    for i, layer in enumerate(model.model.layers):
        for owner in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                module = getattr(owner, name, None)
                if module is not None:
                    quantize_module(module, quantization, contracted_axes(module.spec), matmul,
                                    f"model.layers.{i}.{name}")
    if quantization.embeddings:
        quantize_module(model.model.embed_tokens, quantization, 0, matmul,
                        "model.embed_tokens")
        if not model.config.tie_word_embeddings:
            quantize_module(model.lm_head, quantization, 0, matmul, "lm_head")
    return model


def contracted_axes(spec: str) -> int:
    """How many leading weight axes an einsum 'x,w->out' contracts ('BTNH,NHD->BTD': 2);
    refused unless they lead and the output is x's other axes, then w's."""
    inputs, out = spec.split("->")
    x, w = inputs.split(",")
    contracted = [c for c in w if c in x and c not in out]
    n = len(contracted)
    if "".join(contracted) != w[:n] or out != x[:len(x) - n] + w[n:] or x[len(x) - n:] != w[:n]:
        raise ValueError(f"einsum {spec!r} is not a projection with its input axes leading")
    return n


def layouts(graphdef: Any, state: Any) -> dict[tuple, Layout]:
    """{path of a quantized `weight`: its Layout} for a model's graph and (abstract) state."""
    from flax import nnx

    model = nnx.merge(graphdef, state)
    return {(*path, "weight"): node.quant for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Module) and getattr(node, "quant", None) is not None}


def scale_path(weight_path: tuple) -> tuple:
    return (*weight_path[:-1], "scale")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--quantize, --group-size and --quantize-embeddings, for every command that loads or
    converts a model; `from_args` reads them."""
    group = parser.add_argument_group("quantization")
    group.add_argument("--quantize", choices=SCHEMES, default=None,
                       help="weights of the projections as int8 (per output channel) or int4 "
                            "(groups along the input), symmetric")
    group.add_argument("--group-size", type=int, default=128, metavar="G",
                       help="int4: input rows per scale (default 128)")
    group.add_argument("--quantize-embeddings", action="store_true",
                       help="quantize the embedding table and the head too")


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The load()/convert() keywords of the add_arguments options."""
    return {"quantize": args.quantize, "group_size": args.group_size,
            "quantize_embeddings": args.quantize_embeddings}


def dequantize_params(params: dict, layouts: dict[tuple, Layout], dtype: Any = np.float32,
                      ) -> dict:
    """A pure dict of (host) parameters with every quantized weight dense in `dtype` and the
    scales gone: what an export or a LoRA merge reads."""
    out = _copy_dicts(params)
    for path, layout in layouts.items():
        owner = out
        for key in path[:-1]:
            owner = owner[key]
        owner["weight"] = dequantize(np.asarray(owner["weight"]),
                                     np.asarray(owner.pop("scale")), layout, dtype)
    return out


def _copy_dicts(tree: Any) -> Any:
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree
