"""`phi3-jax demo`: the main job on an embedded default, with no downloads.

Builds a small random Phi-3 checkpoint deterministically, writes it as a Hugging Face folder,
loads it back through `phi3_jax.load` (the same path a real checkpoint takes) and runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import numpy as np
from flax import nnx

from phi3_jax.api import load
from phi3_jax.config import Phi3Config
from phi3_jax.hf_weights import tensor_specs, write_hf_tensors
from phi3_jax.model import Phi3ForCausalLM

DEMO_CONFIG = Phi3Config(
    vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    sliding_window=255, eos_token_id=(2,),
)


def save_random_checkpoint(path: str | os.PathLike, config: Phi3Config = DEMO_CONFIG,
                           seed: int = 0) -> str:
    """Writes a deterministic random checkpoint for `config` as a Hugging Face folder."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    _, params = nnx.split(Phi3ForCausalLM(config, rngs=nnx.Rngs(seed)))
    flat = dict(nnx.to_flat_state(params))
    tensors = [(s.hf_name, s.to_hf(np.asarray(flat[s.path].get_value())))
               for s in tensor_specs(config)]
    write_hf_tensors(path, tensors)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf(), f, indent=2)
    return path


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        save_random_checkpoint(tmp, seed=args.seed)
        model = load(tmp)
        ids = np.random.RandomState(args.seed).randint(0, model.config.vocab_size, (2, 12))
        logits = np.asarray(model.logits(ids))
        completions = model.generate(ids, max_new_tokens=args.max_new_tokens)
    print(f"random Phi-3 ({model.config.num_hidden_layers} layers, d={model.config.hidden_size}):"
          f" logits {logits.shape}, next tokens {logits[:, -1].argmax(-1).tolist()}")
    for i, out in enumerate(completions):
        shown = out.text if out.text is not None else out.token_ids
        print(f"generated {i} ({len(out.token_ids)} tokens, {out.finish_reason}): {shown}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded default model (no downloads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(func=run)
