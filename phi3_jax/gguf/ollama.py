"""Ollama's side of the bridge: its local model store (name -> GGUF blob) and Modelfiles.

The store is a folder (`$OLLAMA_MODELS`, else `~/.ollama/models`) holding

    manifests/<registry>/<namespace>/<model>/<tag>   a JSON manifest per pulled or created tag
    blobs/sha256-<hex>                               content-addressed layers

A manifest lists layers by media type and digest; the weights are the layer of type
`application/vnd.ollama.image.model`, a plain GGUF file. A bare name is resolved as Ollama does:
`phi3` is `registry.ollama.ai/library/phi3:latest`, `me/phi3:ft` is in namespace `me`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

PREFIX = "ollama:"
DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
MODEL_LAYER = "application/vnd.ollama.image.model"
ADAPTER_LAYER = "application/vnd.ollama.image.adapter"


class OllamaError(FileNotFoundError):
    """The store, the tag or its weights are not there."""


def store_dir() -> str:
    return os.environ.get("OLLAMA_MODELS") or os.path.join(os.path.expanduser("~"), ".ollama",
                                                           "models")


def parse_name(name: str) -> tuple[str, str, str, str]:
    """'phi3:mini' -> (registry, namespace, model, tag), with Ollama's defaults."""
    if name.startswith(PREFIX):
        name = name[len(PREFIX):]
    path, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "")
    parts = path.split("/")
    if not path or any(not p or p in (".", "..") for p in parts) or len(parts) > 3 or (
            tag and ("/" in tag or tag in (".", ".."))):
        raise OllamaError(f"{name!r} is not an Ollama model name (expected e.g. phi3, phi3:mini, "
                          f"namespace/model:tag)")
    registry, namespace = DEFAULT_REGISTRY, DEFAULT_NAMESPACE
    if len(parts) == 3:
        registry, namespace, model = parts
    elif len(parts) == 2:
        namespace, model = parts
    else:
        model = parts[0]
    return registry, namespace, model, tag or DEFAULT_TAG


def resolve(name: str, store: str | None = None) -> str:
    """The GGUF blob of an Ollama model name (with or without the 'ollama:' prefix)."""
    store = store or store_dir()
    registry, namespace, model, tag = parse_name(name)
    shown = f"{model}:{tag}" if (registry, namespace) == (DEFAULT_REGISTRY, DEFAULT_NAMESPACE) \
        else f"{registry}/{namespace}/{model}:{tag}"
    manifests = os.path.join(store, "manifests")
    if not os.path.isdir(manifests):
        raise OllamaError(f"no Ollama model store at {store} (no manifests/ folder); set "
                          f"OLLAMA_MODELS to the store, or pull the model with `ollama pull "
                          f"{shown}`")
    manifest = os.path.join(manifests, registry, namespace, model, tag)
    if not os.path.isfile(manifest):
        known = ", ".join(list_models(store)) or "none"
        raise OllamaError(f"Ollama has no model {shown} in {store} (models there: {known}); "
                          f"`ollama pull {shown}` fetches it")
    try:
        with open(manifest, encoding="utf-8") as f:
            layers = json.load(f)["layers"]
        model_layers = [layer for layer in layers if layer.get("mediaType") == MODEL_LAYER]
        adapters = [layer for layer in layers if layer.get("mediaType") == ADAPTER_LAYER]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise OllamaError(f"Ollama manifest {manifest} is not readable: {e}") from e
    if len(model_layers) != 1:
        raise OllamaError(f"Ollama manifest {manifest} has {len(model_layers)} model layers; "
                          f"expected one GGUF")
    if adapters:
        raise OllamaError(f"Ollama model {shown} applies a LoRA adapter on top of its GGUF; "
                          f"phi3-jax reads plain GGUF models only")
    digest = str(model_layers[0].get("digest", ""))
    algo, _, hexdigest = digest.partition(":")
    if algo != "sha256" or not hexdigest.isalnum():
        raise OllamaError(f"Ollama manifest {manifest}: bad model layer digest {digest!r}")
    blob = os.path.join(store, "blobs", f"sha256-{hexdigest}")
    if not os.path.isfile(blob):
        raise OllamaError(f"the weights of Ollama model {shown} ({blob}) are missing from the "
                          f"store; `ollama pull {shown}` restores them")
    size = model_layers[0].get("size")
    if isinstance(size, int) and os.path.getsize(blob) != size:
        raise OllamaError(f"the weights of Ollama model {shown} ({blob}) have "
                          f"{os.path.getsize(blob)} bytes; its manifest says {size}: an "
                          f"interrupted pull?")
    return blob


def list_models(store: str) -> list[str]:
    """The store's model names, as `ollama list` shows them."""
    root = os.path.join(store, "manifests")
    names = []
    for dirpath, _, files in os.walk(root):
        rel = os.path.relpath(dirpath, root).split(os.sep)
        if len(rel) != 3:
            continue
        registry, namespace, model = rel
        prefix = "" if (registry, namespace) == (DEFAULT_REGISTRY, DEFAULT_NAMESPACE) else \
            f"{registry}/{namespace}/"
        names += [f"{prefix}{model}:{tag}" for tag in files]
    return sorted(names)


# ---- Modelfile ----
# Ollama renders prompts with Go templates, not Jinja: one per Phi chat format. `.Messages` is
# the whole conversation; the last assistant turn is left open for the model to write.
_TEMPLATES = {
    "phi3": (
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
        "<|{{ .Role }}|>\n{{ .Content }}<|end|>\n"
        "{{ if and $last (ne .Role \"assistant\") }}<|assistant|>\n{{ end }}\n"
        "{{- end }}"),
    "phi4": (
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
        "<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>\n"
        "{{- if and $last (ne .Role \"assistant\") }}<|im_start|>assistant<|im_sep|>{{ end }}\n"
        "{{- end }}"),
    "phi4mini": (
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
        "<|{{ .Role }}|>{{ .Content }}<|end|>\n"
        "{{- if and $last (ne .Role \"assistant\") }}<|assistant|>{{ end }}\n"
        "{{- end }}"),
}


def chat_family(rendered: str) -> str | None:
    """Which Go template matches a checkpoint's chat format, from its rendering of one user
    message "X" with the generation prompt (None: no Phi format)."""
    if "<|im_start|>user<|im_sep|>X" in rendered:
        return "phi4"
    if "<|user|>\nX" in rendered:
        return "phi3"
    if "<|user|>X" in rendered:
        return "phi4mini"
    return None


def modelfile(gguf_name: str, family: str | None, stop: Sequence[str]) -> str:
    """A Modelfile for `ollama create NAME -f Modelfile`, next to the GGUF file `gguf_name`."""
    lines = [f"FROM ./{gguf_name}", ""]
    if family is not None:
        lines += [f'TEMPLATE """{_TEMPLATES[family]}"""', ""]
    lines += [f'PARAMETER stop "{s}"' for s in stop]
    return "\n".join(lines) + "\n"
