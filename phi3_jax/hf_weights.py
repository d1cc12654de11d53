"""The Hugging Face checkpoint layout: a table from tensor names to parameters, and its reader.

Each entry names one safetensors tensor, the parameter it becomes, its checkpoint shape, and a
pair of pure layout changes (to ours and back). They only transpose and reshape, so a round
trip is bit-exact. Loading checks, before reading any data, that every tensor the model needs
is present exactly once with the right shape, and that nothing unexpected is left over: a
wrong checkpoint fails with the tensor's name and file, never with silently wrong logits.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from phi3_jax import finite, textio
from phi3_jax.checkpoint_files import checkpoint_file
from phi3_jax.config import Phi3Config
from phi3_jax.safetensors_io import SafetensorsFile

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

Path = tuple[str | int, ...]


class CheckpointError(ValueError):
    """A checkpoint's tensors are missing, extra, misshapen, or its files are absent."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    hf_name: str
    path: Path  # the parameter's path in the NNX state
    hf_shape: tuple[int, ...]
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _identity(x: np.ndarray) -> np.ndarray:
    return x


def tensor_specs(config: Phi3Config) -> list[TensorSpec]:
    """Every tensor of a Phi3ForCausalLM checkpoint for `config`, in the checkpoint's order."""
    D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    N, K, G, H = (config.num_attention_heads, config.num_key_value_heads, config.group_size,
                  config.head_dim)

    def qkv_to_jax(w):  # [(N + 2K) H, D], rows Q | K | V  ->  [D, K, G + 2, H]
        q = w[: N * H].reshape(K, G, H, D)
        k = w[N * H: (N + K) * H].reshape(K, 1, H, D)
        v = w[(N + K) * H:].reshape(K, 1, H, D)
        return np.concatenate([q, k, v], axis=1).transpose(3, 0, 1, 2)

    def qkv_to_hf(w):  # [D, K, G + 2, H] -> [(N + 2K) H, D]
        w = w.transpose(1, 2, 3, 0)  # [K, G + 2, H, D]
        q = w[:, :G].reshape(N * H, D)
        k = w[:, G].reshape(K * H, D)
        v = w[:, G + 1].reshape(K * H, D)
        return np.concatenate([q, k, v], axis=0)

    specs = [TensorSpec("model.embed_tokens.weight", ("model", "embed_tokens", "weight"),
                        (V, D), _identity, _identity)]
    for i in range(config.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", ("model", "layers", i)
        specs += [
            TensorSpec(hf + "input_layernorm.weight", (*ours, "input_layernorm", "weight"),
                       (D,), _identity, _identity),
            TensorSpec(hf + "self_attn.qkv_proj.weight",
                       (*ours, "self_attn", "qkv_proj", "weight"),
                       ((N + 2 * K) * H, D), qkv_to_jax, qkv_to_hf),
            TensorSpec(hf + "self_attn.o_proj.weight", (*ours, "self_attn", "o_proj", "weight"),
                       (D, N * H),
                       lambda w: w.T.reshape(N, H, D),  # [D, N H] -> [N, H, D]
                       lambda w: w.reshape(N * H, D).T),
            TensorSpec(hf + "post_attention_layernorm.weight",
                       (*ours, "post_attention_layernorm", "weight"), (D,), _identity, _identity),
            TensorSpec(hf + "mlp.gate_up_proj.weight", (*ours, "mlp", "gate_up_proj", "weight"),
                       (2 * F, D),
                       lambda w: w.reshape(2, F, D).transpose(2, 0, 1),  # -> [D, 2, F]
                       lambda w: w.transpose(1, 2, 0).reshape(2 * F, D)),
            TensorSpec(hf + "mlp.down_proj.weight", (*ours, "mlp", "down_proj", "weight"),
                       (D, F), lambda w: w.T, lambda w: w.T),  # [D, F] <-> [F, D]
        ]
    specs.append(TensorSpec("model.norm.weight", ("model", "norm", "weight"), (D,),
                            _identity, _identity))
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head", "weight"), (V, D),
                                _identity, _identity))
    return specs


class HFCheckpoint:
    """The safetensors files of a Hugging Face folder, with every tensor located by name.

    Every file the folder names (the index's shards) must be a plain relative path whose file
    lies inside the folder, or in its Hub cache's blob store (see phi3_jax.checkpoint_files).
    `read` refuses tensors holding NaN or infinities unless `allow_nonfinite`.
    """

    def __init__(self, path: str | os.PathLike, *, allow_nonfinite: bool = False):
        self.path = os.fspath(path)
        self.allow_nonfinite = allow_nonfinite
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"no model folder at {self.path}")
        index = checkpoint_file(self.path, INDEX_FILE, what="the safetensors index")
        single = checkpoint_file(self.path, SINGLE_FILE, what="the safetensors file")
        if os.path.isfile(index):
            weight_map = _read_weight_map(index)
            for file in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(self.path, file)):
                    raise CheckpointError(f"shard {file} listed in {INDEX_FILE} is missing "
                                          f"from {self.path}")
        elif os.path.isfile(single):
            weight_map = None
        else:
            raise CheckpointError(f"{self.path} has neither {SINGLE_FILE} nor {INDEX_FILE}")
        self._files: dict[str, SafetensorsFile] = {}
        self.location: dict[str, str] = {}  # tensor name -> file name
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        for file in files:
            st = self._file(file)
            for name in st:
                if weight_map is not None and weight_map.get(name) != file:
                    raise CheckpointError(f"tensor {name!r} is in {file} but {INDEX_FILE} "
                                          f"places it in {weight_map.get(name)!r}")
                self.location[name] = file
        if weight_map is not None:
            for name, file in weight_map.items():
                if name not in self.location:
                    raise CheckpointError(f"tensor {name!r} is listed in {INDEX_FILE} but "
                                          f"missing from {file}")

    def _file(self, file: str) -> SafetensorsFile:
        if file not in self._files:
            self._files[file] = SafetensorsFile(os.path.join(self.path, file))
        return self._files[file]

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor's memory-mapped view, unchecked (for its dtype and shape)."""
        return self._file(self.location[name])[name]

    def read(self, name: str) -> np.ndarray:
        """The tensor's memory-mapped view, checked for NaN and infinities as its pages are
        read (unless allow_nonfinite), before anything is built from it."""
        array = self[name]
        if not self.allow_nonfinite:
            finite.check_host(array, name, os.path.join(self.path, self.location[name]))
        return array

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(self.location[name]).shape(name)

    def release(self, name: str) -> None:
        """Releases the mapped pages of the file holding `name` (see SafetensorsFile.release)."""
        self._file(self.location[name]).release()

    def nbytes(self, name: str) -> int:
        return self._file(self.location[name]).nbytes(name)

    def check(self, config: Phi3Config) -> list[TensorSpec]:
        """Validates names and shapes against the config; returns the specs to read."""
        specs = tensor_specs(config)
        expected = {s.hf_name for s in specs}
        for spec in specs:
            if spec.hf_name not in self.location:
                where = (INDEX_FILE if os.path.isfile(os.path.join(self.path, INDEX_FILE))
                         else SINGLE_FILE)
                raise CheckpointError(f"tensor {spec.hf_name!r} is missing from {self.path} "
                                      f"(looked in {where})")
            shape = self.shape(spec.hf_name)
            if shape != spec.hf_shape:
                raise CheckpointError(
                    f"tensor {spec.hf_name!r} in {self.location[spec.hf_name]} has shape "
                    f"{list(shape)}; config.json implies {list(spec.hf_shape)}")
        for name, file in self.location.items():
            if name in expected or name.endswith("rotary_emb.inv_freq"):
                continue  # old saves may carry the (recomputed) rotary buffer
            if name == "lm_head.weight" and config.tie_word_embeddings:
                log.warning("ignoring lm_head.weight in %s: the config ties the head to the "
                            "embedding, as transformers does", file)
                continue
            raise CheckpointError(f"unexpected tensor {name!r} in {file}: not part of a "
                                  f"Phi3ForCausalLM with this config.json")
        return specs



def _read_weight_map(index: str) -> dict[str, str]:
    """The index's weight_map, {tensor name: shard file}, each file checked to be the
    folder's own (checkpoint_files' rule)."""
    raw = textio.read_json_file(index, error=CheckpointError)
    weight_map = raw.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to "
                              f"shard files, got {textio.json_type(weight_map)}")
    folder = os.path.dirname(index)
    for name, file in weight_map.items():
        what = f"{index}: weight_map entry {name!r}"
        if not isinstance(file, str):
            raise CheckpointError(f"{what} must be a file name, got {textio.json_type(file)}")
        checkpoint_file(folder, file, what=what)
    return weight_map


def parse_size(size: str | int) -> int:
    """'2GB', '500MB', '10KiB' or a byte count -> bytes (decimal units, as transformers reads)."""
    if isinstance(size, int):
        return size
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "B": 1}
    text = size.strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * scale)
    if text.isdigit():
        return int(text)
    raise ValueError(f"bad size {size!r}: expected e.g. '2GB', '500MB' or a byte count")


def write_hf_tensors(out_dir: str | os.PathLike,
                     tensors: Iterator[tuple[str, np.ndarray]] | list[tuple[str, np.ndarray]],
                     max_shard_size: str | int | None = None,
                     metadata: dict[str, str] | None = None) -> list[str]:
    """Writes (name, array) pairs as model.safetensors, or as shards plus an index past the cap.

    Arrays are consumed one at a time and each shard is written as soon as it is full, so memory
    stays at one shard's worth of tensors. Returns the file names written.
    """
    from phi3_jax.safetensors_io import write_safetensors

    out_dir = os.fspath(out_dir)
    cap = parse_size(max_shard_size) if max_shard_size is not None else None
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    sizes = [0]
    written: list[tuple[str, list[str], int]] = []

    def flush(index: int) -> None:
        name = f"model-{index:05d}.safetensors"  # renamed below once the count is known
        total = write_safetensors(os.path.join(out_dir, name), shards[-1], metadata)
        written.append((name, [n for n, _ in shards[-1]], total))

    for name, array in tensors:
        nbytes = array.nbytes
        if cap is not None and shards[-1] and sizes[-1] + nbytes > cap:
            flush(len(written) + 1)
            shards[-1], sizes[-1] = [], 0
        shards[-1].append((name, array))
        sizes[-1] += nbytes
    if shards[-1] or not written:
        flush(len(written) + 1)
    if len(written) == 1:
        final = SINGLE_FILE
        os.replace(os.path.join(out_dir, written[0][0]), os.path.join(out_dir, final))
        return [final]
    count = len(written)
    weight_map, files = {}, []
    for i, (tmp, names, _) in enumerate(written, start=1):
        final = f"model-{i:05d}-of-{count:05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final))
        files.append(final)
        weight_map.update({n: final for n in names})
    total = sum(size for _, _, size in written)
    with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return [*files, INDEX_FILE]


def write_hf_folder(out_dir: str | os.PathLike, config: Phi3Config, params: dict,
                    dtype: str = "float32", source_dir: str | os.PathLike | None = None,
                    generation_config: dict | None = None) -> str:
    """Writes `params` (nested dicts by parameter path, our layout) as a Hugging Face folder:
    config.json, safetensors, and the tokenizer files of `source_dir` and generation_config.json
    when given.

    The files are written into a temporary folder inside `out_dir` and moved into place one by
    one, config.json last: a folder with a config.json is complete.
    """
    from phi3_jax.params import resolve_dtype
    from phi3_jax.tokenizer import copy_tokenizer_files

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    np_dtype = np.dtype(resolve_dtype(dtype))
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        tensors = []
        for spec in tensor_specs(config):
            array = params
            for key in spec.path:
                array = array[key]
            tensors.append((spec.hf_name,
                            np.ascontiguousarray(spec.to_hf(np.asarray(array).astype(np_dtype)))))
        write_hf_tensors(tmp, tensors)
        if source_dir is not None:
            copy_tokenizer_files(source_dir, tmp, missing_ok=True)
        if generation_config:
            _write_json(os.path.join(tmp, "generation_config.json"), generation_config)
        hf_config: dict[str, Any] = config.to_hf()
        hf_config["torch_dtype"] = str(np_dtype) if dtype != "bfloat16" else "bfloat16"
        _write_json(os.path.join(tmp, "config.json"), hf_config)
        names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    return out_dir


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
