"""The fine-tuned model as a Hugging Face folder (LoRA merged): loadable by phi3_jax.load and by
transformers, with the base model's tokenizer and generation config beside it."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from phi3_jax.api import resolve_dtype
from phi3_jax.config import Phi3Config
from phi3_jax.hf_weights import tensor_specs, write_hf_tensors
from phi3_jax.tokenizer import copy_tokenizer_files
from phi3_jax.train.lora import LoRAConfig, merge_lora


def final_params(trainable: dict, frozen: dict | None, lora: LoRAConfig | None) -> dict:
    """The model's parameters (pure dict, host arrays): trainable, or base + merged LoRA."""
    if lora is None:
        return trainable
    return merge_lora(frozen, trainable, lora)


def write_hf_folder(out_dir: str | os.PathLike, config: Phi3Config, params: dict,
                    dtype: str = "float32", source_dir: str | os.PathLike | None = None,
                    generation_config: dict | None = None) -> str:
    """Writes config.json, model.safetensors, tokenizer files and generation_config.json.

    The files are written into a temporary folder inside `out_dir` and moved into place one by
    one, config.json last: a folder with a config.json is complete.
    """
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
