"""Hugging Face safetensors -> phi3-jax Orbax checkpoint, streamed one tensor at a time.

Every name and shape is checked before any data is read (`HFCheckpoint.check`). Each tensor is
then read from its memory map, put in our layout and dtype, written, and dropped; the pages it
touched are handed back to the kernel right away, because mapped file pages count towards a
process's resident memory just as allocations do. Peak memory is a few copies of the largest
tensor, whatever the model's size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from phi3_jax import orbax_checkpoint as ock
from phi3_jax import quantize as quantize_lib
from phi3_jax.atomic import atomic_directory, check_destination
from phi3_jax.checkpoint_files import checkpoint_file
from phi3_jax.config import Phi3Config
from phi3_jax.hf_weights import HFCheckpoint, TensorSpec
from phi3_jax.interrupts import check_interrupted
from phi3_jax.model import abstract_model
from phi3_jax.params import COMPUTE_DTYPES, resolve_dtype

SIDE_FILES = ("generation_config.json",)


def convert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None,
            force: bool = False, progress: bool = True, allow_nonfinite: bool = False,
            quantize: str | None = None, group_size: int = 128,
            quantize_embeddings: bool = False) -> dict[str, Any]:
    """Converts a Hugging Face Phi-3 folder into a phi3-jax Orbax checkpoint at `out_dir`.

    `dtype` ("bfloat16", "float32", "float16") defaults to the checkpoint's own. An existing
    `out_dir` is refused unless `force`, and then replaced only once the new one is complete.
    Returns the metadata record written with the checkpoint. A tensor holding NaN or infinity
    is refused by name unless `allow_nonfinite`. A GGUF file or an Ollama model name
    ('ollama:phi3:mini') is read by phi3_jax.gguf instead.

    `quantize` ("int8" or "int4", int4 in groups of `group_size`; phi3_jax.quantize) stores the
    projections (and with `quantize_embeddings` the embedding and head) quantized, each tensor
    quantized as it is read; the scheme goes into the metadata record. `dtype` is then that of
    the other weights.
    """
    from phi3_jax import gguf

    quantization = quantize_lib.resolve(quantize, group_size, quantize_embeddings)
    if quantization is not None and ock.is_orbax_checkpoint(hf_dir):
        meta = ock.read_metadata(hf_dir)
        what = ("already quantized" if ock.stored_quantization(meta) is not None
                else "a phi3-jax Orbax checkpoint")
        raise ValueError(f"{hf_dir} is {what}; --quantize reads a Hugging Face folder")
    if gguf.is_gguf_source(hf_dir):
        if quantization is not None:
            raise ValueError(f"{hf_dir}: --quantize reads a Hugging Face folder, not GGUF "
                             f"(load it with quantize= instead)")
        return gguf.convert_gguf(hf_dir, out_dir, dtype=dtype, force=force, progress=progress,
                                 allow_nonfinite=allow_nonfinite)
    hf_dir = os.path.abspath(hf_dir)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"no model folder at {hf_dir}")
    out_dir = check_destination(out_dir, force, sources=(hf_dir,))
    config = Phi3Config.from_hf(hf_dir)
    checkpoint = HFCheckpoint(hf_dir, allow_nonfinite=allow_nonfinite)
    specs = checkpoint.check(config)
    target = _target_dtype(dtype, checkpoint, specs)
    # A group size that does not divide a weight is refused here, before anything is written.
    graphdef, abstract = abstract_model(config, target, quantization=quantization)
    layouts = quantize_lib.layouts(graphdef, abstract)
    stored = {path: (tuple(var.shape), np.dtype(var.dtype))
              for path, var in nnx.to_flat_state(abstract)}
    total = sum(math.prod(shape) * dt.itemsize for shape, dt in stored.values())

    start = time.perf_counter()
    with atomic_directory(out_dir, force, sources=(hf_dir,)) as tmp, tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
            disable=not progress, leave=False) as bar:
        tensors = {}
        for order, spec in enumerate(specs):
            layout = layouts.get(spec.path)
            produce = _reader(checkpoint, spec, target)
            paths = [spec.path]
            if layout is not None:  # weight, then scale, from one quantization of the source
                paths.append(quantize_lib.scale_path(spec.path))
                produce = _quantizer(_reader(checkpoint, spec, np.dtype(np.float32)), layout)
            for k, path in enumerate(paths):
                last = k == len(paths) - 1
                tensors[path] = ock.LazyTensor(
                    *stored[path], produce=produce if layout is None else produce[k],
                    order=2 * order + k,
                    written=_releaser(checkpoint, spec, bar, stored[path], last))
        ock.save_params(os.path.join(tmp, ock.PARAMS_DIR), tensors)
        check_interrupted()
        tokenizer_files = _copy_side_files(hf_dir, tmp, target)
        source_dtypes = sorted({_dtype_name(checkpoint[s.hf_name].dtype) for s in specs})
        check_interrupted()
        dense = {path: tuple(var.shape)
                 for path, var in nnx.to_flat_state(abstract_model(config, target)[1])}
        meta = write_record(tmp, hf_dir, source_dtypes, target, specs, dense, tokenizer_files,
                            quantization, total)
    meta["seconds"] = time.perf_counter() - start
    return meta


def write_record(folder: str, source: str, source_dtypes: list[str], dtype: np.dtype,
                 specs: list[TensorSpec], shapes: dict, tokenizer_files: list[str],
                 quantization: quantize_lib.Quantization | None = None,
                 nbytes: int | None = None) -> dict:
    """Writes the checkpoint's metadata record, last, with the checksums of every other file
    (orbax_checkpoint.write_metadata): its presence is what marks the folder a complete
    checkpoint. Returns the record. `shapes`: the dense parameters' shapes by path; `nbytes`
    (default: all of them in `dtype`) what is stored, for a quantized checkpoint."""
    parameters = int(sum(np.prod(shapes[s.path]) for s in specs))
    meta = {
        "format": ock.FORMAT,
        "format_version": ock.FORMAT_VERSION,
        "source": source,
        "source_dtypes": source_dtypes,
        "dtype": _dtype_name(dtype),
        "tensor_count": len(specs),
        "parameter_count": parameters,
        "bytes": parameters * np.dtype(dtype).itemsize if nbytes is None else nbytes,
        "params": ock.PARAMS_DIR,
        "tokenizer_files": tokenizer_files,
        "phi3_jax_version": _version(),
        "orbax_checkpoint_version": ock.orbax_version(),
    }
    if quantization is not None:
        meta["quantization"] = quantization.to_json()
    return ock.write_metadata(folder, meta)


def _target_dtype(dtype: str | None, checkpoint: HFCheckpoint,
                  specs: list[TensorSpec]) -> np.dtype:
    if dtype is not None:
        return np.dtype(resolve_dtype(dtype))
    found = {np.dtype(checkpoint[s.hf_name].dtype) for s in specs}
    supported = {np.dtype(d) for d in COMPUTE_DTYPES.values()}
    if len(found) == 1 and found <= supported:
        return found.pop()
    names = sorted(map(_dtype_name, found))
    raise ValueError(f"{checkpoint.path} stores {', '.join(names)} tensors; pass --dtype "
                     f"(one of {', '.join(sorted(COMPUTE_DTYPES))})")


def _quantizer(produce: Callable[[], np.ndarray], layout: quantize_lib.Layout,
               ) -> tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]:
    """(weight, scale) producers of one quantization: the first call quantizes, the second
    hands over the other half (the writer takes them in that order, one after the other)."""
    held: list[np.ndarray] = []

    def weight() -> np.ndarray:
        q, s = quantize_lib.quantize(produce(), layout)
        held.append(s)
        return q

    def scale() -> np.ndarray:
        return held.pop()
    return weight, scale


def _reader(checkpoint: HFCheckpoint, spec: TensorSpec, dtype: np.dtype):
    def produce() -> np.ndarray:
        check_interrupted()  # between tensors: nothing is in flight
        # A memory-mapped view; when layout and dtype already match, it is written as it is.
        return relayout(spec.to_jax, checkpoint.read(spec.hf_name)).astype(dtype, copy=False)
    return produce


def relayout(change: Callable[[np.ndarray], np.ndarray], array: np.ndarray) -> np.ndarray:
    """change(array) made C-contiguous, for a change that only moves elements (a transpose,
    reshape or concatenation), done on the raw bits: numpy's own copy loops for unsigned ints
    are several times faster than bfloat16's, which come from ml_dtypes."""
    bits = np.dtype(f"u{array.dtype.itemsize}")
    return ock.contiguous(change(array.view(bits))).view(array.dtype)


def _releaser(checkpoint: HFCheckpoint, spec: TensorSpec, bar: tqdm,
              stored: tuple[tuple[int, ...], np.dtype], last: bool = True):
    """Advances the bar by an array's bytes; after a tensor's last array, releases its pages."""
    shape, dtype = stored
    nbytes = math.prod(shape) * dtype.itemsize

    def written() -> None:
        if last:
            checkpoint.release(spec.hf_name)
        bar.update(nbytes)
    return written


def _copy_side_files(hf_dir: str, out: str, dtype: np.dtype) -> list[str]:
    """config.json (its dtype field updated), generation_config.json and the tokenizer files."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    for key in ("torch_dtype", "dtype"):  # transformers v4 writes the first, v5 the second
        if key in config:
            config[key] = _dtype_name(dtype)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in SIDE_FILES:
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copy2(checkpoint_file(hf_dir, name, what=name), os.path.join(out, name))
    return copy_tokenizer(hf_dir, out)


def copy_tokenizer(src: str, dst: str) -> list[str]:
    """The tokenizer files `src` has, copied into `dst` (none if it ships no tokenizer)."""
    from phi3_jax.tokenizer import copy_tokenizer_files

    return sorted(p.name for p in copy_tokenizer_files(src, dst, missing_ok=True))


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def _version() -> str:
    from phi3_jax import __version__

    return __version__
