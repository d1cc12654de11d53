"""`phi3-jax demo`: the main job on the embedded default model, with no downloads.

The embedded model (phi3_jax/embedded) is a small Phi-3 trained with `phi3-jax finetune` to
solve linear equations; the demo loads it through `phi3_jax.load` (the path a real checkpoint
takes) and generates answers with `model.generate`, greedy, in the Phi-3 chat format.
`save_random_checkpoint` writes deterministic random checkpoints for tests and benchmarks.
"""

from __future__ import annotations

import argparse
import os

from flax import nnx

from phi3_jax.api import load
from phi3_jax.config import Phi3Config
from phi3_jax.hf_weights import write_hf_folder
from phi3_jax.model import Phi3ForCausalLM


def save_random_checkpoint(path: str | os.PathLike, config: Phi3Config, seed: int = 0) -> str:
    """Writes a deterministic random checkpoint for `config` as a Hugging Face folder."""
    _, params = nnx.split(Phi3ForCausalLM(config, rngs=nnx.Rngs(seed)))
    return write_hf_folder(path, config, nnx.to_pure_dict(params))


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
