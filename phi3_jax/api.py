"""The public entry points: `load` a checkpoint, then call `logits` (and `generate`) on it."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from phi3_jax import finite, orbax_checkpoint, sharding
from phi3_jax import quantize as quantize_lib
from phi3_jax.attention import Kernels, choose_kernels
from phi3_jax.checkpoint_files import check_tree
from phi3_jax.compilation import StaticGraph, bucket_length
from phi3_jax.config import Phi3Config, read_generation_config
from phi3_jax.engine import Completion, Engine, GenerationSettings
from phi3_jax.engine.request import check_token_ids
from phi3_jax.hf_weights import HFCheckpoint
from phi3_jax.model import Phi3ForCausalLM, abstract_model
from phi3_jax.params import fill_state, place, resolve_dtype


@functools.partial(jax.jit, static_argnums=0)
def _forward(graph: StaticGraph, params: nnx.State, tokens: jax.Array, lengths: jax.Array,
             slots: jax.Array) -> jax.Array:
    """Logits [B, T, V] of right-padded rows (row b's tokens at its first lengths[b] slots of
    tokens [B, Tb]), placed at the caller's slots [B, T] (-1: a padding slot, zero logits)."""
    model = nnx.merge(graph.graphdef, params)
    Tb = tokens.shape[1]
    positions = jnp.where(jnp.arange(Tb)[None, :] < lengths[:, None], jnp.arange(Tb)[None, :],
                          -1)
    x, _ = model.hidden_states(tokens, positions, prefill_lengths=lengths)  # [B, Tb, D]
    x = jnp.take_along_axis(x, jnp.maximum(slots, 0)[:, :, None], axis=1)  # [B, T, D]
    logits = model.head.attend(x)
    return jnp.where(slots[:, :, None] >= 0, logits, 0)


class Phi3:
    """A loaded model: config, parameters (an nnx.State pytree), and tokenizer if present."""

    def __init__(self, config: Phi3Config, graphdef: nnx.GraphDef, params: nnx.State, *,
                 tokenizer: Any = None, generation_config: dict | None = None,
                 mesh: Mesh | None = None, path: str | None = None):
        self.config = config
        self.graphdef = graphdef  # also sets self.graph
        self.params = params
        self.tokenizer = tokenizer
        self.generation_config = generation_config or {}
        self.mesh = mesh
        self.path = path

    @property
    def graphdef(self) -> nnx.GraphDef:
        return self.graph.graphdef

    @graphdef.setter
    def graphdef(self, graphdef: nnx.GraphDef) -> None:
        self.graph = StaticGraph(graphdef)  # what the jitted functions take

    @property
    def kernels(self) -> Kernels:
        """The attention computations chosen at load (`load(..., attention=...)`)."""
        return self.module().kernels

    @property
    def quantization(self) -> quantize_lib.Quantization | None:
        """How the weights are quantized (`load(..., quantize=...)`), or None."""
        return self.module().quantization

    @property
    def dtype(self) -> jnp.dtype:
        # The final norm: never quantized, unlike the embedding may be.
        return self.params["model"]["norm"]["weight"].dtype

    def module(self) -> Phi3ForCausalLM:
        """The NNX module bound to these parameters (for research use: probing, surgery)."""
        return nnx.merge(self.graphdef, self.params)

    def logits(self, input_ids: Sequence[Sequence[int]] | np.ndarray | jax.Array,
               attention_mask: Sequence[Sequence[int]] | np.ndarray | jax.Array | None = None,
               ) -> jax.Array:
        """[B, T, V] logits of a full forward pass, in the parameters' dtype.

        With an attention_mask (1 = token, 0 = padding; left or right padding), each row's
        positions count only its own tokens, so a row's logits equal those of the row alone;
        logits at padded positions are zero.

        Each row's tokens are packed to the front before the model runs, as a prompt prefill:
        the fused causal kernel on GPUs, and on other backends the blocked attention for rows of
        512 tokens or more, so memory grows linearly with the length.
        """
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, length] with length >= 1, "
                             f"got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"input_ids must be integers, got {ids.dtype}")
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        mask = mask.astype(bool)
        check_token_ids(ids[mask], self.config.vocab_size)
        B, T = ids.shape
        lengths = mask.sum(axis=1).astype(np.int32)
        if lengths.max() > self.config.max_position_embeddings:
            raise ValueError(f"a row has {lengths.max()} tokens, more than the model's "
                             f"max_position_embeddings ({self.config.max_position_embeddings})")
        # A token's position is its rank among its row's tokens, which is also its slot once the
        # row is packed; bucketing the length bounds recompiles (the extra slots are padding).
        slots = np.where(mask, np.cumsum(mask, axis=1) - 1, -1).astype(np.int32)
        Tb = bucket_length(T)
        tokens = np.zeros((B, Tb), np.int32)
        out_slots = np.full((B, Tb), -1, np.int32)
        out_slots[:, :T] = slots
        rows, cols = np.nonzero(mask)
        tokens[rows, slots[rows, cols]] = ids[rows, cols]
        # Data-parallel over a mesh: the same host value on every process.
        arrays = (sharding.put_batch(a, self.mesh) for a in (tokens, lengths, out_slots))
        return _forward(self.graph, self.params, *arrays)[:, :T]

    def generate(self, prompts: Any, settings: GenerationSettings | None = None,
                 **kwargs: Any) -> list[Completion]:
        """Continuations of prompts (strings, token-id lists or chats) through the inference
        engine; see phi3_jax.generate.generate for the settings."""
        from phi3_jax.generate import generate

        return generate(self, prompts, settings, **kwargs)

    def engine(self, **kwargs: Any) -> Engine:
        """An inference engine on this model (continuous batching, requests submitted at any
        time); see phi3_jax.engine.Engine for max_slots, max_len, prefill_chunk, decode_steps,
        max_logprobs and max_queue."""
        return Engine(self, **kwargs)


def load(path: str | os.PathLike, dtype: str | jnp.dtype = "float32",
         mesh: str | dict | Mesh | None = None, attention: str = "auto",
         allow_nonfinite: bool = False, quantize: str | None = None, group_size: int = 128,
         quantize_embeddings: bool = False) -> Phi3:
    """Loads a Hugging Face folder (config.json + safetensors, single or sharded), a
    phi3-jax Orbax checkpoint (made by `phi3-jax convert`), or a llama.cpp/Ollama GGUF file
    ("model.gguf", or "ollama:phi3:mini" from the local Ollama store; see phi3_jax.gguf).

    With a mesh (a Mesh, or a spec such as "data=2,model=4"), every parameter is placed
    straight onto its shards: each device receives only its slice, never the whole tensor.
    `attention` picks the attention computations once, for every later call (see
    phi3_jax.attention.choose_kernels): "auto" (the fast paths on GPUs, the blocked prefill
    elsewhere), "xla" (the reference everywhere), "blocked" or "cudnn".

    A checkpoint may reference only its own files (phi3_jax.checkpoint_files), and a weight
    holding NaN or infinity is refused by name (checked as it is read; phi3_jax.finite) unless
    `allow_nonfinite`.

    `quantize` ("int8" or "int4"; see phi3_jax.quantize) quantizes the projections' weights
    (and with `quantize_embeddings` the embedding and head) one tensor at a time as they are
    read: int4 in groups of `group_size` input rows. A checkpoint `phi3-jax convert --quantize`
    wrote loads quantized as it was stored; `dtype` is then the activations' and the other
    weights'.
    """
    from phi3_jax import gguf

    path = os.fspath(path)
    dtype = resolve_dtype(dtype)
    quantization = quantize_lib.resolve(quantize, group_size, quantize_embeddings)
    source = gguf.open_gguf(path) if gguf.is_gguf_source(path) else None
    if source is None and not os.path.isdir(path):
        raise FileNotFoundError(f"no model folder at {path}")
    is_orbax = source is None and orbax_checkpoint.is_orbax_checkpoint(path)
    if is_orbax:  # TensorStore opens the files below params/ itself: check them all first
        for name in (orbax_checkpoint.MARKER, orbax_checkpoint.PARAMS_DIR):
            check_tree(path, name, what=f"the Orbax checkpoint's {name}")
        meta = orbax_checkpoint.verify_checkpoint(path)  # metadata, then every file's checksum
        stored = orbax_checkpoint.stored_quantization(meta)
        if stored is not None and quantization is not None:
            raise ValueError(f"{path} is already quantized ({stored.scheme}, group size "
                             f"{stored.group_size}); load it without quantize=")
        quantization = stored or quantization
    if source is not None:
        config, specs = source.config, source.specs
    else:
        config = Phi3Config.from_hf(path)
    if source is None and not is_orbax:
        checkpoint = HFCheckpoint(path, allow_nonfinite=allow_nonfinite)
        specs = checkpoint.check(config)  # every name and shape, before any data is read
    mesh = sharding.make_mesh(mesh) if mesh is not None else None
    kernels = choose_kernels(attention, dtype, heads_split=mesh is not None
                             and sharding.heads_split(config, mesh), sharded=mesh is not None)
    graphdef, abstract = abstract_model(config, dtype, kernels, quantization)
    layouts = quantize_lib.layouts(graphdef, abstract)
    targets = (dict(nnx.to_flat_state(sharding.param_shardings(abstract, mesh)))
               if mesh is not None else None)
    if is_orbax:
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        arrays = orbax_checkpoint.restore_params(
            os.path.join(path, orbax_checkpoint.PARAMS_DIR),
            {p: (tuple(var.shape), var.dtype, targets[p] if targets else one_device)
             for p, var in nnx.to_flat_state(abstract)})
        if not allow_nonfinite:
            finite.check_on_device(list(arrays.values()),
                                   [orbax_checkpoint.param_name(p) for p in arrays], path)
    else:
        # Streamed one tensor at a time: read (a GGUF tensor dequantized straight into `dtype`),
        # laid out, quantized if asked, placed on its shards, released.
        arrays, checked = {}, []  # checked: what the finiteness check reads, per spec
        for spec in specs:
            host = (source.read(spec, dtype) if source is not None
                    else checkpoint[spec.hf_name])
            for p, array, dt in _placed(spec, host, dtype, layouts.get(spec.path)):
                arrays[p] = place(array, dt, targets[p] if targets else None)
            # A quantized tensor's NaN or infinity reaches its scales (absmax).
            checked.append(arrays[quantize_lib.scale_path(spec.path)
                                  if spec.path in layouts else spec.path])
            (source or checkpoint).release(spec.hf_name)
        if not allow_nonfinite:  # on device, as placed (phi3_jax.finite)
            for i in finite.nonfinite_on_device(checked):
                name = specs[i].hf_name
                if source is not None:
                    raise finite.NonFiniteError(
                        f"{path}: tensor {name!r} holds NaN or infinity once read as "
                        f"{dtype.name} (allow_nonfinite / --allow-nonfinite loads it anyway)")
                checkpoint.read(name)  # raises naming the first bad element
                raise finite.NonFiniteError(
                    f"{path}: tensor {name!r} is finite in the checkpoint but "
                    f"overflows {dtype.name}; load it in a wider dtype")
    if source is not None:
        tokenizer, generation_config, path = (source.tokenizer, source.generation_config,
                                              source.path)
    else:
        tokenizer = _tokenizer_if_present(path)
        generation_config = read_generation_config(path, config.vocab_size)
    return Phi3(config, graphdef, fill_state(abstract, arrays), tokenizer=tokenizer,
                generation_config=generation_config, mesh=mesh, path=path)


def _placed(spec: Any, host: np.ndarray, dtype: jnp.dtype, layout: quantize_lib.Layout | None,
            ) -> list[tuple[tuple, np.ndarray, Any]]:
    """(path, host array, dtype) to place for one checkpoint tensor: the tensor in our layout,
    or its quantized weight and scales."""
    dense = spec.to_jax(host)
    if layout is None:
        return [(spec.path, dense, dtype)]
    weight, scale = quantize_lib.quantize(np.asarray(dense), layout)
    return [(spec.path, weight, weight.dtype),
            (quantize_lib.scale_path(spec.path), scale, scale.dtype)]


def _tokenizer_if_present(path: str) -> Any:
    """The folder's Tokenizer, or None when it ships no tokenizer files."""
    from phi3_jax.tokenizer import Tokenizer

    try:
        return Tokenizer.from_dir(path)
    except FileNotFoundError:
        return None
