"""The embedded default model: a small Phi-3 trained to solve linear equations (see task.py).

`MODEL_DIR` is a Hugging Face folder (bf16 safetensors, SentencePiece tokenizer with the Phi-3
chat tokens and template, generation_config.json) that `phi3_jax.load` and transformers read.
make_embedded.py, beside it, made it.
"""

import os

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")

__all__ = ["MODEL_DIR"]
