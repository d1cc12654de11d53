"""GGUF, llama.cpp's and Ollama's model format, both ways.

- `load("model.gguf")` / `load("ollama:phi3:mini")` (through `phi3_jax.load`): a Phi-3 family
  GGUF (llama.cpp architecture `phi3`) as a phi3-jax model, quantized tensors dequantized to the
  requested dtype, with its tokenizer, chat template and stop ids.
- `convert_gguf(source, out_dir)` (through `phi3-jax convert`): the same, streamed into an Orbax
  checkpoint folder that also holds the Hub-style config and tokenizer files.
- `export_gguf(checkpoint, "out.gguf", file_type="f16" | "q8_0" | "q4_0")` (through
  `phi3-jax export`): a GGUF that llama.cpp and Ollama run, and a Modelfile beside it.

Modules: reader (hyperparameters and tensors), vocab (tokenizers), writer (export), ollama (the
local model store and Modelfiles), loading (load and convert). Only this module is imported by the
rest of phi3-jax, and it imports nothing heavy: the `gguf` package is needed from the first read.
"""

from __future__ import annotations

import os
from typing import Any

from phi3_jax.gguf.ollama import PREFIX as OLLAMA_PREFIX


def is_gguf_source(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file or an Ollama model ('ollama:NAME[:TAG]')."""
    path = os.fspath(path)
    if path.startswith(OLLAMA_PREFIX):
        return True
    if not os.path.isfile(path):
        return path.endswith(".gguf")  # a missing .gguf file gets the GGUF error
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def resolve(path: str | os.PathLike) -> str:
    """The GGUF file a source names: the file itself, or an Ollama model's weights blob."""
    path = os.fspath(path)
    if path.startswith(OLLAMA_PREFIX):
        from phi3_jax.gguf import ollama

        return ollama.resolve(path)
    return path


def open_gguf(path: str | os.PathLike) -> Any:
    """A GGUF source for phi3_jax.load (see loading.GGUFSource)."""
    from phi3_jax.gguf.loading import GGUFSource

    return GGUFSource(path)


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, **kwargs: Any) -> dict:
    from phi3_jax.gguf.loading import convert_gguf as convert

    return convert(path, out_dir, **kwargs)


def export_gguf(source: str | os.PathLike, out: str | os.PathLike, **kwargs: Any) -> list[str]:
    from phi3_jax.gguf.writer import export_gguf as export

    return export(source, out, **kwargs)


__all__ = ["convert_gguf", "export_gguf", "is_gguf_source", "open_gguf", "resolve"]
