"""Start-up hook that lets the `lm_eval` command find phi3-jax's backend (`--model phi3-jax`).

lm-evaluation-harness 0.4 looks models up in its registry and has no plugin entry points: a
model outside its tree is found only if its module was imported. Installed with phi3-jax, the
one-line `phi3_jax_lm_eval.pth` imports this module at interpreter start; it imports nothing
heavy and does nothing until lm-eval's registry module is imported, then registers "phi3-jax"
as a lazy placeholder ("phi3_jax.lm_eval_backend:Phi3JaxLM"), so JAX loads only when the
model is asked for. lm-eval fills its built-in models (hf, vllm, ...) only when the registry is
empty at the first lookup, so they are registered first.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib.abc import MetaPathFinder

REGISTRY = "lm_eval.api.registry"
NAME, TARGET = "phi3-jax", "phi3_jax.lm_eval_backend:Phi3JaxLM"


class _RegistryWatcher(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != REGISTRY:
            return None
        sys.meta_path.remove(self)  # once; the real finders locate the module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            register(module)

        spec.loader.exec_module = exec_module
        return spec


def register(registry) -> None:
    """Registers phi3-jax (lazily) in lm-eval's model registry, after its built-in models."""
    import lm_eval.models  # noqa: F401  (registers hf, vllm, ... as placeholders)

    if NAME not in registry.model_registry:
        registry.model_registry.register(NAME, target=TARGET)


def install() -> None:
    if REGISTRY in sys.modules:  # lm-eval already imported (an interactive session)
        register(sys.modules[REGISTRY])
    elif not any(isinstance(f, _RegistryWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryWatcher())
