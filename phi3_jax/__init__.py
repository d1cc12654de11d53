"""phi3-jax: Microsoft's Phi-3 family (Phi-3, Phi-3.5, Phi-4, Phi-4-mini) in pure JAX."""

from phi3_jax.api import Phi3, load
from phi3_jax.config import ConfigError, Phi3Config
from phi3_jax.engine import (
    Completion,
    Engine,
    GenerationSettings,
    Request,
    RequestOutput,
    SettingsError,
    TokenLogprob,
)
from phi3_jax.model import Phi3ForCausalLM
from phi3_jax.tokenizer import TOKENIZER_FILES, StreamDecoder, Tokenizer, copy_tokenizer_files

__version__ = "0.1.0"

__all__ = [
    "TOKENIZER_FILES",
    "Completion",
    "ConfigError",
    "Engine",
    "GenerationSettings",
    "Phi3",
    "Phi3Config",
    "Phi3ForCausalLM",
    "Request",
    "RequestOutput",
    "SettingsError",
    "StreamDecoder",
    "TokenLogprob",
    "Tokenizer",
    "__version__",
    "copy_tokenizer_files",
    "load",
]
