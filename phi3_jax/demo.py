"""`phi3-jax demo`: the main job on the embedded default model, with no downloads.

The embedded model (phi3_jax/embedded) is a small Phi-3 trained with `phi3-jax finetune` to
solve linear equations; the demo loads it through `phi3_jax.load` (the path a real checkpoint
takes) and generates answers with `model.generate`, greedy, in the Phi-3 chat format.
`save_random_checkpoint` writes deterministic random checkpoints for tests and benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os

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
    from phi3_jax.embedded import MODEL_DIR, task

    model = load(MODEL_DIR)
    # By default, problems the model never saw in training.
    questions = args.problem or [p.prompt for p in task.held_out_problems(3, seed=args.seed)]
    outs = model.generate([[{"role": "user", "content": q}] for q in questions],
                          max_new_tokens=args.max_new_tokens)
    c = model.config
    print(f"embedded Phi-3 ({c.num_hidden_layers} layers, d={c.hidden_size}, vocab "
          f"{c.vocab_size}), trained by `phi3-jax finetune` to solve a*x + b = c:")
    for question, out in zip(questions, outs, strict=True):
        print(f"  {question}  ->  {out.text}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded default model (no downloads)")
    p.add_argument("--problem", action="append", metavar="TEXT",
                   help='a question, e.g. "Solve 2x + 3 = 7." (repeatable; default: three '
                        "held-out problems)")
    p.add_argument("--seed", type=int, default=0, help="which held-out problems to show")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.set_defaults(func=run)
