"""phi3-jax Orbax checkpoint -> Hugging Face safetensors folder that transformers loads.

Tensors come back in the checkpoint's dtype under their original names and shapes; the layout
changes are pure transposes and reshapes, so HF -> Orbax -> HF is bit-exact. They are restored
one layer at a time and each is written as soon as the safetensors writer reaches it (the writer
needs only shapes up front), so memory stays at about one layer.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from convert.hf_to_orbax import SIDE_FILES, copy_tokenizer, relayout
from phi3_jax import finite
from phi3_jax import orbax_checkpoint as ock
from phi3_jax import quantize as quantize_lib
from phi3_jax.atomic import atomic_directory, check_destination
from phi3_jax.checkpoint_files import check_tree, checkpoint_file
from phi3_jax.config import Phi3Config
from phi3_jax.hf_weights import TensorSpec, parse_size, tensor_specs, write_hf_tensors
from phi3_jax.interrupts import check_interrupted
from phi3_jax.model import abstract_model
from phi3_jax.params import resolve_dtype

Path = tuple[str | int, ...]


def export(orbax_dir: str | os.PathLike, hf_dir: str | os.PathLike,
           max_shard_size: str | int = "2GB", force: bool = False,
           progress: bool = True, allow_nonfinite: bool = False) -> list[str]:
    """Writes the checkpoint as a Hugging Face folder; returns the file names written.

    Shards past `max_shard_size` (with model.safetensors.index.json); a tied model has no
    lm_head.weight. A quantized checkpoint's weights are written dequantized, in its dtype.
    An existing `hf_dir` is refused unless `force`. A parameter holding NaN or infinity is
    refused by name unless `allow_nonfinite`.
    """
    orbax_dir = os.path.abspath(orbax_dir)
    if not os.path.isdir(orbax_dir):
        raise FileNotFoundError(f"no checkpoint folder at {orbax_dir}")
    checkpoint_file(orbax_dir, ock.MARKER, what=ock.MARKER)  # its own file, not a link out
    meta = ock.read_metadata(orbax_dir)
    hf_dir = check_destination(hf_dir, force, sources=(orbax_dir,))
    parse_size(max_shard_size)  # a bad size fails before anything is written
    # Every file read is checked against its checksum, before the output is renamed into place.
    with atomic_directory(hf_dir, force, sources=(orbax_dir,)) as tmp, \
            ock.verifying(orbax_dir, meta):
        config = Phi3Config.from_hf(orbax_dir)
        dtype = resolve_dtype(meta["dtype"])
        graphdef, abstract = abstract_model(config, dtype,
                                            quantization=ock.stored_quantization(meta))
        shapes = {path: tuple(var.shape) for path, var in nnx.to_flat_state(abstract)}
        specs = tensor_specs(config)
        total = sum(int(np.prod(s.hf_shape)) * dtype.itemsize for s in specs)
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="export",
                  disable=not progress, leave=False) as bar:
            params = meta.get("params", ock.PARAMS_DIR)  # a name the checkpoint gives: its own
            check_tree(orbax_dir, params, what=f"{ock.MARKER}'s \"params\"")
            reader = _LayerReader(os.path.join(orbax_dir, params), [s.path for s in specs],
                                  shapes, dtype, allow_nonfinite,
                                  quantize_lib.layouts(graphdef, abstract))
            tensors = [(s.hf_name, _PendingTensor(s, dtype, reader.get, bar.update))
                       for s in specs]
            files = write_hf_tensors(tmp, tensors, max_shard_size, metadata={"format": "pt"})
        shutil.copy2(checkpoint_file(orbax_dir, "config.json", what="config.json"),
                     os.path.join(tmp, "config.json"))
        files.append("config.json")
        for name in SIDE_FILES:
            if os.path.isfile(os.path.join(orbax_dir, name)):
                shutil.copy2(checkpoint_file(orbax_dir, name, what=name), os.path.join(tmp, name))
                files.append(name)
        files += copy_tokenizer(orbax_dir, tmp)
    return files


def _group(path: Path) -> Any:
    """Parameters restored together: one decoder layer, or one top-level tensor."""
    return path[:3] if path[:2] == ("model", "layers") else path


class _LayerReader:
    """Restores one group of parameters at a time and hands each array out once; a quantized
    weight (one in `layouts`) comes out dequantized, in `dtype` like the others."""

    def __init__(self, directory: str, paths: list[Path], shapes: dict[Path, tuple[int, ...]],
                 dtype: np.dtype, allow_nonfinite: bool = False,
                 layouts: dict[Path, quantize_lib.Layout] | None = None):
        self.directory, self.shapes, self.dtype = directory, shapes, dtype
        self.allow_nonfinite = allow_nonfinite
        self.layouts = layouts or {}
        self.groups: dict[Any, list[Path]] = {}
        for path in paths:
            group = self.groups.setdefault(_group(path), [])
            group.append(path)
            if path in self.layouts:
                group.append(quantize_lib.scale_path(path))
        self.arrays: dict[Path, np.ndarray] = {}

    def get(self, path: Path) -> np.ndarray:
        layout = self.layouts.get(path)
        if layout is None:
            return self._take(path, self.dtype)
        (_, weight_dtype, _), _ = layout.stored()
        weight = self._take(path, np.dtype(weight_dtype))
        scale = self._take(quantize_lib.scale_path(path), np.dtype(quantize_lib.SCALE_DTYPE))
        return quantize_lib.dequantize(weight, scale, layout, self.dtype)

    def _take(self, path: Path, dtype: np.dtype) -> np.ndarray:
        if path not in self.arrays:
            self.arrays = ock.restore_host(self.directory, self.groups[_group(path)],
                                           self.shapes, dtype)
        array = self.arrays.pop(path)
        if array.dtype != dtype:
            raise ock.OrbaxCheckpointError(f"{self.directory}: parameter {ock.param_name(path)} "
                                           f"is stored as {array.dtype}, not {dtype}")
        if not self.allow_nonfinite:
            finite.check_host(array, ock.param_name(path), self.directory)
        return array


class _PendingTensor:
    """Shape and dtype now, bytes when the safetensors writer converts it to an array."""

    def __init__(self, spec: TensorSpec, dtype: np.dtype, get: Callable[[Path], np.ndarray],
                 done: Callable[[int], Any]):
        self.spec, self.dtype, self.shape = spec, dtype, spec.hf_shape
        self._get, self._done = get, done

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        check_interrupted()
        array = relayout(self.spec.to_hf, self._get(self.spec.path))
        if array.shape != self.shape:
            raise ValueError(f"{self.spec.hf_name}: exported shape {array.shape} != "
                             f"{self.shape}")
        self._done(self.nbytes)
        return array if dtype is None else array.astype(dtype, copy=False)
