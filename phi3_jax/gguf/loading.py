"""GGUF -> phi3-jax: a source phi3_jax.load reads (`GGUFSource`) or an Orbax checkpoint folder
(`convert_gguf`).

Both check every tensor name and shape against the metadata before reading data, then stream the
tensors one at a time in file order, dequantizing each straight into the target dtype. A
quantized file has no dtype of its own to keep: `convert` then stores bfloat16 (the Phi
checkpoints' training dtype) unless told otherwise.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from phi3_jax.gguf import resolve, vocab
from phi3_jax.gguf.reader import GGUFCheckpoint

# The GGUF types that are a dtype of ours; anything else (quantized) converts to bfloat16.
_KEEP = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class GGUFSource:
    """A GGUF file (or 'ollama:NAME[:TAG]') opened for phi3_jax.load: its config, the checked
    tensor specs (every name and shape checked before any data is read), its tokenizer and
    generation config, and `read`, which dequantizes one tensor straight into a dtype."""

    def __init__(self, source: str | os.PathLike):
        from phi3_jax.config import read_generation_config
        from phi3_jax.tokenizer import Tokenizer

        self.path = resolve(source)
        self.checkpoint = GGUFCheckpoint(self.path)
        self.config = self.checkpoint.config
        self.specs = self.checkpoint.check()
        with tempfile.TemporaryDirectory(prefix="phi3-jax-gguf-") as tmp:
            # tokenizer.json alone: the tokenizer then runs as the Hub's and llama.cpp's do.
            vocab.write_tokenizer_files(self.checkpoint, tmp, sentencepiece_model=False)
            self.tokenizer = Tokenizer.from_dir(tmp)
            self.generation_config = read_generation_config(tmp)

    def read(self, spec: Any, dtype: Any) -> np.ndarray:
        return self.checkpoint.get(spec.hf_name, np.dtype(dtype))

    def release(self, name: str) -> None:
        self.checkpoint.release()


def convert_gguf(source: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None,
                 force: bool = False, progress: bool = True,
                 allow_nonfinite: bool = False) -> dict[str, Any]:
    """Streams a GGUF file (or 'ollama:NAME[:TAG]') into a phi3-jax Orbax checkpoint at
    `out_dir`, with config.json, generation_config.json and the tokenizer files of a Hub folder.

    `dtype` defaults to the file's weight type when it is float32/float16/bfloat16, else
    bfloat16. Returns the metadata record written with the checkpoint, as convert() does. A tensor
    holding NaN or infinity (once read as `dtype`) is refused by name unless allow_nonfinite."""
    from flax import nnx
    from tqdm.auto import tqdm

    from convert.hf_to_orbax import write_record
    from phi3_jax import finite
    from phi3_jax import orbax_checkpoint as ock
    from phi3_jax.atomic import atomic_directory, check_destination
    from phi3_jax.interrupts import check_interrupted
    from phi3_jax.model import abstract_model
    from phi3_jax.params import COMPUTE_DTYPES

    path = os.path.abspath(resolve(source))
    check_destination(out_dir, force, sources=(path,))
    checkpoint = GGUFCheckpoint(path)
    config = checkpoint.config
    specs = checkpoint.check()
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose from "
                         f"{sorted(COMPUTE_DTYPES)}")
    target = np.dtype(COMPUTE_DTYPES[dtype or _KEEP.get(checkpoint.weight_type(), "bfloat16")])
    _, abstract = abstract_model(config, target)
    shapes = {p: tuple(v.shape) for p, v in nnx.to_flat_state(abstract)}
    total = sum(int(np.prod(shapes[s.path])) * target.itemsize for s in specs)

    start = time.perf_counter()
    with atomic_directory(out_dir, force, sources=(path,)) as tmp:
        # The tokenizer first: a file without one fails before any weight is written.
        tokenizer_files = vocab.write_tokenizer_files(checkpoint, tmp)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
                   disable=not progress, leave=False)

        def reader(spec):
            def produce() -> np.ndarray:
                check_interrupted()
                array = checkpoint.get(spec.hf_name, target)
                if not allow_nonfinite:
                    finite.check_host(array, spec.hf_name, path)
                return spec.to_jax(array)
            return produce

        def written(spec):
            def done() -> None:
                checkpoint.release()
                bar.update(int(np.prod(shapes[spec.path])) * target.itemsize)
            return done

        tensors = {spec.path: ock.LazyTensor(shapes[spec.path], target, produce=reader(spec),
                                             order=order, written=written(spec))
                   for order, spec in enumerate(specs)}
        with bar:
            ock.save_params(os.path.join(tmp, ock.PARAMS_DIR), tensors)
        check_interrupted()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(checkpoint, target), f, indent=2)
        meta = write_record(tmp, path, checkpoint.type_names(), target, specs, shapes,
                            sorted(tokenizer_files))
    meta["seconds"] = time.perf_counter() - start
    return meta


def hf_config(checkpoint: GGUFCheckpoint, dtype: np.dtype) -> dict[str, Any]:
    """The config.json of the model, as transformers reads it."""
    config = checkpoint.config
    out = config.to_hf()
    original = checkpoint.meta("phi3.rope.scaling.original_context_length")
    if config.rope_scaling is None and original is not None:
        out["original_max_position_embeddings"] = int(original)  # unused, but kept for export
    if config.rope_scaling is not None:
        # The file's own magnitude factor, which need not be the sqrt rule's (legacy "yarn").
        out["rope_scaling"]["attention_factor"] = config.rope_scaling.attention_factor
    out["torch_dtype"] = dtype.name
    return out
