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
from phi3_jax.hooks import PROBS, Hook, capture_names, check_names
from phi3_jax.model import Phi3ForCausalLM, abstract_model
from phi3_jax.params import fill_state, place, resolve_dtype


@functools.partial(jax.jit, static_argnames=("graph", "capture"))
def _forward(graph: StaticGraph, params: nnx.State, tokens: jax.Array | None,
             embeds: jax.Array | None, lengths: jax.Array, slots: jax.Array,
             hooks: dict[str, Hook] | None, capture: tuple[str, ...] = (),
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits [B, T, V] of right-padded rows (row b's tokens, or embeddings, at its first
    lengths[b] slots of tokens [B, Tb] or embeds [B, Tb, D]), placed at the caller's slots
    [B, T] (-1: a padding slot, zero logits); and the `capture` points, placed the same way."""
    model = nnx.merge(graph.graphdef, params)
    Tb = slots.shape[1]
    positions = jnp.where(jnp.arange(Tb)[None, :] < lengths[:, None], jnp.arange(Tb)[None, :],
                          -1)
    x, _, captured = model.activations(tokens, positions, prefill_lengths=lengths,
                                       inputs_embeds=embeds, hooks=hooks,
                                       capture=capture)  # [B, Tb, D]
    logits = model.head.attend(_unpack(x, slots, 1))
    return (jnp.where(slots[:, :, None] >= 0, logits, 0),
            {name: _unpack(v, slots, *((2, 3) if name.endswith(PROBS) else (1,)))
             for name, v in captured.items()})


def _unpack(x: jax.Array, slots: jax.Array, *axes: int) -> jax.Array:
    """x with each of `axes` (packed token slots) gathered to the caller's layout by slots
    [B, T]; padding entries are zero."""
    for axis in axes:
        index = jnp.maximum(slots, 0).reshape(slots.shape[:1] + (1,) * (axis - 1)
                                              + slots.shape[1:] + (1,) * (x.ndim - axis - 1))
        x = jnp.take_along_axis(x, index, axis=axis)
        valid = (slots >= 0).reshape(index.shape)
        x = jnp.where(valid, x, 0)
    return x


def _cut(value: jax.Array, name: str, B: int, T: int) -> jax.Array:
    """A captured value without the mesh's padding rows and the length bucket's slots."""
    if name.endswith(PROBS):
        return value[:B, :, :T, :T]
    return value[:B, :T]


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

    def replace(self, **changes: Any) -> Phi3:
        """A new handle with some fields replaced (params, tokenizer, generation_config, mesh,
        path), e.g. `model.replace(params=edited)` after editing weights; `self` is unchanged.
        The compiled programs are shared as long as the graph is."""
        fields = dict(config=self.config, graphdef=self.graphdef, params=self.params,
                      tokenizer=self.tokenizer, generation_config=self.generation_config,
                      mesh=self.mesh, path=self.path)
        unknown = set(changes) - set(fields) - {"config", "graphdef"}
        if unknown:
            raise TypeError(f"replace() got unknown fields {sorted(unknown)}")
        fields.update(changes)
        config, graphdef, params = (fields.pop(k) for k in ("config", "graphdef", "params"))
        return Phi3(config, graphdef, params, **fields)

    def embed(self, input_ids: Sequence[Sequence[int]] | np.ndarray | jax.Array) -> jax.Array:
        """[B, T, D] the input embeddings of token ids [B, T], in the model's dtype (looked up
        and dequantized when the table is quantized): what `inputs_embeds` stands in for."""
        ids = jnp.asarray(input_ids, jnp.int32)
        return self.module().model.embed_tokens(ids, self.dtype)

    def logits(self, input_ids: Sequence[Sequence[int]] | np.ndarray | jax.Array | None = None,
               attention_mask: Sequence[Sequence[int]] | np.ndarray | jax.Array | None = None,
               *, inputs_embeds: np.ndarray | jax.Array | None = None,
               hooks: dict[str, Hook] | None = None) -> jax.Array:
        """[B, T, V] logits of a full forward pass, in the parameters' dtype.

        input_ids [B, T], or inputs_embeds [B, T, D] (vectors in the embedding space, e.g.
        `model.embed(ids)` edited). With an attention_mask
        (1 = token, 0 = padding; left or right padding), each row's positions count only its
        own tokens, so a row's logits equal those of the row alone; logits at padded positions
        are zero. `hooks` ({point name: Hook}, phi3_jax.hooks) replace values at named points;
        a hook's numbers are traced, so new values compile nothing.

        Each row's tokens are packed to the front before the model runs, as a prompt prefill:
        the fused causal kernel on GPUs, and on other backends the blocked attention for rows of
        512 tokens or more, so memory grows linearly with the length. On a mesh, the batch is
        padded to a multiple of the data axis, as generate does.
        """
        return self._run(input_ids, attention_mask, inputs_embeds, hooks, ())[0]

    def run_with_cache(self, input_ids: Sequence[Sequence[int]] | np.ndarray | jax.Array
                       | None = None,
                       attention_mask: Sequence[Sequence[int]] | np.ndarray | jax.Array
                       | None = None, *, inputs_embeds: np.ndarray | jax.Array | None = None,
                       names: Sequence[str] | str | None = None,
                       layers: Sequence[int] | None = None,
                       hooks: dict[str, Hook] | None = None,
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(logits, cache): `logits` as returns, and the activations at the named points
        (phi3_jax.hooks), in the caller's layout: [B, T, ...] ([B, N, T, T] for attn.probs),
        zero at padding.

        names: point names, local ("resid_post", "attn.probs": taken at each of `layers`) or
        full ("layers.3.attn.q", "embed", "final_norm"); default every point except attn.probs.
        layers: layer indices for local names (default all). Only the asked-for points are
        kept; attn.probs makes its layers alone take the reference attention ([B, N, T, T]
        scores). Values are after any hook at the same point.
        """
        capture = capture_names(self.config.num_hidden_layers, names, layers)
        return self._run(input_ids, attention_mask, inputs_embeds, hooks, capture)

    def score(self, contexts: Sequence[str] | str, continuations: Sequence[str] | str,
              **kwargs: Any) -> list[Any]:
        """Each continuation's per-token logprobs after its context, their total, and whether
        it is the greedy continuation (a phi3_jax.scoring.Score each). Tokenized as
        lm-evaluation-harness's HF backend does: the whole string, split after the context.
        Keywords: batch_size, progress, hooks."""
        from phi3_jax import scoring

        return scoring.score(self, contexts, continuations, **kwargs)

    def loglikelihood_rolling(self, texts: Sequence[str] | str, window: int | None = None,
                              **kwargs: Any) -> list[float]:
        """Each text's total logprob, scored in disjoint windows of at most `window` tokens
        (default: the context), as lm-eval's loglikelihood_rolling. Keywords: batch_size,
        progress, hooks."""
        from phi3_jax import scoring

        return scoring.loglikelihood_rolling(self, texts, window=window, **kwargs)

    def perplexity(self, texts: Sequence[str] | str, window: int | None = None,
                   **kwargs: Any) -> float:
        """exp(-mean token logprob) over the texts (scored as loglikelihood_rolling)."""
        from phi3_jax import scoring

        return scoring.perplexity(self, texts, window=window, **kwargs)

    def _run(self, input_ids, attention_mask, inputs_embeds, hooks, capture):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is not None:
            embeds = np.asarray(inputs_embeds)
            D = self.config.hidden_size
            if embeds.ndim != 3 or embeds.shape[1] == 0 or embeds.shape[2] != D:
                raise ValueError(f"inputs_embeds must be [batch, length, {D}] with length "
                                 f">= 1, got shape {embeds.shape}")
            shape = embeds.shape[:2]
        else:
            ids = np.asarray(input_ids)
            if ids.ndim != 2 or ids.shape[1] == 0:
                raise ValueError(f"input_ids must be [batch, length] with length >= 1, "
                                 f"got shape {ids.shape}")
            if not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"input_ids must be integers, got {ids.dtype}")
            shape = ids.shape
        mask = np.ones(shape, bool) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input shape {shape}")
        mask = mask.astype(bool)
        if inputs_embeds is None:
            check_token_ids(ids[mask], self.config.vocab_size)
        if hooks:
            check_names(hooks, self.config.num_hidden_layers)
        B, T = shape
        lengths = mask.sum(axis=1).astype(np.int32)
        if lengths.max() > self.config.max_position_embeddings:
            raise ValueError(f"a row has {lengths.max()} tokens, more than the model's "
                             f"max_position_embeddings ({self.config.max_position_embeddings})")
        # A token's position is its rank among its row's tokens, which is also its slot once the
        # row is packed; bucketing the length bounds recompiles (the extra slots are padding).
        # On a mesh, empty rows (length 0) pad the batch to a multiple of the data axis.
        Bp = B if self.mesh is None else -(-B // self._data_size()) * self._data_size()
        slots = np.where(mask, np.cumsum(mask, axis=1) - 1, -1).astype(np.int32)
        Tb = bucket_length(T)
        out_slots = np.full((Bp, Tb), -1, np.int32)
        out_slots[:B, :T] = slots
        rows, cols = np.nonzero(mask)
        tokens = embeds_packed = None
        if inputs_embeds is None:
            tokens = np.zeros((Bp, Tb), np.int32)
            tokens[rows, slots[rows, cols]] = ids[rows, cols]
        else:
            embeds_packed = np.zeros((Bp, Tb, embeds.shape[2]), self.dtype)
            embeds_packed[rows, slots[rows, cols]] = embeds[rows, cols]
        lengths = np.concatenate([lengths, np.zeros(Bp - B, np.int32)])
        # Data-parallel over a mesh: the same host value on every process.
        arrays = [None if a is None else sharding.put_batch(a, self.mesh)
                  for a in (tokens, embeds_packed, lengths, out_slots)]
        logits, captured = _forward(self.graph, self.params, *arrays, hooks,
                                    capture=tuple(capture))
        return logits[:B, :T], {name: _cut(v, name, B, T) for name, v in captured.items()}

    def _data_size(self) -> int:
        return sharding.axis_size(self.mesh, sharding.RULES["batch"])

    def generate(self, prompts: Any, settings: GenerationSettings | None = None,
                 **kwargs: Any) -> list[Completion]:
        """Continuations of prompts (strings, token-id lists or chats) through the inference
        engine; see phi3_jax.generate.generate for the settings."""
        from phi3_jax.generate import generate

        return generate(self, prompts, settings, **kwargs)

    def engine(self, **kwargs: Any) -> Engine:
        """An inference engine on this model (continuous batching, requests submitted at any
        time); see phi3_jax.engine.Engine for max_slots, max_len, prefill_chunk, decode_steps,
        max_logprobs, max_queue, buckets_per_octave, bucket_rows, compilation_cache and
        hooks."""
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
