"""The public entry points: `load` a checkpoint, then call `logits` (and `generate`) on it."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from phi3_jax import sharding
from phi3_jax.config import Phi3Config
from phi3_jax.hf_weights import HFCheckpoint
from phi3_jax.model import Phi3ForCausalLM

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; choose from {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    dtype = jnp.dtype(dtype)
    if dtype not in {jnp.dtype(d) for d in DTYPES.values()}:
        raise ValueError(f"dtype {dtype} is not supported; choose from {sorted(DTYPES)}")
    return dtype


def abstract_model(config: Phi3Config, dtype: str | jnp.dtype = "float32",
                   ) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph and its parameters as ShapeDtypeStructs, allocating nothing."""
    dtype = resolve_dtype(dtype)
    model = nnx.eval_shape(lambda: Phi3ForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def bucket_length(n: int, minimum: int = 16, per_octave: int = 1) -> int:
    """The smallest bucket >= n (at least `minimum`). Buckets split each octave (2^k, 2^(k+1)]
    into `per_octave` equal steps: 1 gives powers of two; 4 wastes at most 25% of a length for
    4 compiled shapes per octave. Either way recompiles stay logarithmic in the range."""
    if n <= minimum:
        return minimum
    top = 1 << (n - 1).bit_length()  # the power of two >= n
    step = max(1, top // (2 * per_octave))
    return -(-n // step) * step


class StaticGraph:
    """A model's graphdef as a jit static argument, hashed once.

    jit hashes its static arguments on every call, and a GraphDef rehashes its whole node tree
    each time: 2 ms for Phi-3-mini's 32 layers on a 2-core CPU, per dispatch, which a streamed
    generation pays per token. Equal graphdefs still make equal keys, so two loads of one
    architecture share their compiled programs.
    """

    __slots__ = ("_hash", "graphdef")

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef = graphdef
        self._hash = hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, StaticGraph) and self._hash == other._hash
                                 and self.graphdef == other.graphdef)


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
    def dtype(self) -> jnp.dtype:
        return self.params["model"]["embed_tokens"]["weight"].dtype

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

    def generate(self, prompts: Any, **kwargs: Any) -> Any:
        """Generates from prompts (strings or token-id lists); see phi3_jax.generate.generate."""
        from phi3_jax.generate import generate

        return generate(self, prompts, **kwargs)

    def warmup(self, shapes: Sequence[tuple[int, int]], **kwargs: Any) -> int:
        """Builds generate()'s programs for these (rows, prompt length) shapes before the first
        request; see phi3_jax.generate.warmup."""
        from phi3_jax.generate import warmup

        return warmup(self, shapes, **kwargs)


def check_token_ids(ids: np.ndarray, vocab_size: int) -> None:
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"token ids {sorted(set(bad.tolist()))[:8]} are outside the vocabulary "
                         f"[0, {vocab_size})")


def load(path: str | os.PathLike, dtype: str | jnp.dtype = "float32",
         mesh: str | dict | Mesh | None = None) -> Phi3:
    """Loads a Hugging Face folder (config.json + safetensors, single or sharded) or a
    phi3-jax Orbax checkpoint (made by `phi3-jax convert`).

    With a mesh (a Mesh, or a spec such as "data=2,model=4"), every parameter is placed
    straight onto its shards: each device receives only its slice, never the whole tensor.
    """
    path = os.fspath(path)
    dtype = resolve_dtype(dtype)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no model folder at {path}")
    from phi3_jax import orbax_checkpoint

    if orbax_checkpoint.is_orbax_checkpoint(path):
        return orbax_checkpoint.load(path, dtype=dtype, mesh=mesh)
    config = Phi3Config.from_hf(path)
    checkpoint = HFCheckpoint(path)
    specs = checkpoint.check(config)  # every name and shape, before any data is read
    mesh = sharding.make_mesh(mesh) if mesh is not None else None
    graphdef, abstract = abstract_model(config, dtype)
    shardings = sharding.param_shardings(abstract, mesh) if mesh is not None else None
    arrays = {}
    for spec in specs:
        array = spec.to_jax(checkpoint[spec.hf_name])
        target = None
        if shardings is not None:
            target = _lookup(shardings, spec.path)
        arrays[spec.path] = place(array, dtype, target)
        checkpoint.release(spec.hf_name)
    params = fill_state(abstract, arrays)
    return Phi3(config, graphdef, params, tokenizer=load_tokenizer_if_present(path),
                generation_config=read_generation_config(path), mesh=mesh, path=path)


def place(array: np.ndarray, dtype: jnp.dtype, target: jax.sharding.Sharding | None) -> jax.Array:
    """Puts a host array on device(s) in `dtype`; with a sharding, each device gets its slice."""
    if target is None:
        return jax.device_put(np.asarray(array).astype(dtype, copy=False))
    return jax.make_array_from_callback(
        array.shape, target, lambda index: np.asarray(array[index]).astype(dtype, copy=False))


def fill_state(abstract: nnx.State, arrays: dict[tuple, jax.Array]) -> nnx.State:
    """The abstract state with each leaf replaced by arrays[path]; every leaf must be given."""
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        if path not in arrays:
            raise KeyError(f"no value for parameter {'.'.join(map(str, path))}")
        value = arrays[path]
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"parameter {'.'.join(map(str, path))}: shape {value.shape} != "
                             f"{var.shape}")
        flat.append((path, var.replace(value)))
    return nnx.from_flat_state(flat)


def _lookup(tree: nnx.State, path: tuple) -> Any:
    node = tree
    for key in path:
        node = node[key]
    return node.get_value() if isinstance(node, nnx.Variable) else node


def read_generation_config(path: str) -> dict:
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def load_tokenizer_if_present(path: str) -> Any:
    """The folder's Tokenizer, or None when it ships no tokenizer files."""
    from phi3_jax.tokenizer import Tokenizer

    try:
        return Tokenizer.from_dir(path)
    except FileNotFoundError:
        return None
