"""`phi3-jax finetune`: full or LoRA fine-tuning from a JSONL file, resumable, exported as HF."""

from __future__ import annotations

import argparse
import logging
import sys

from phi3_jax import interrupts, quantize, sharding
from phi3_jax.train.data import OVERFLOW_POLICIES
from phi3_jax.train.lora import TARGETS


def run(args: argparse.Namespace) -> int:
    from phi3_jax.train.checkpoint import ResumeError
    from phi3_jax.train.trainer import FinetuneConfig, TrainingDiverged, finetune

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    config = FinetuneConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seq_len=args.seq_len, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, clip_norm=args.clip_norm,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_targets=targets,
        remat=args.remat, dtype=args.dtype, save_dtype=args.save_dtype,
        save_every=args.save_every, seed=args.seed, mesh=sharding.mesh_from_args(args),
        overflow=args.overflow, allow_nonfinite=args.allow_nonfinite,
        **quantize.from_args(args))
    try:
        with interrupts.command():
            result = finetune(args.model, args.data, args.out, config)
    except (TrainingDiverged, ResumeError) as e:
        print(f"phi3-jax finetune: {e}", file=sys.stderr)
        return 1
    last = result.losses.get(result.final_step)
    print(f"wrote {result.out_dir} (step {result.final_step}"
          + (f", loss {last:.4f}" if last is not None else "")
          + (f", {result.tokens_per_second:,.0f} tokens/s" if result.tokens_per_second else "")
          + ")")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a model (full or LoRA) on a JSONL file",
        description="Fine-tunes MODEL on JSONL records ({'messages': [...]}, {'text': ...} or "
                    "{'input_ids': [...]}) and writes OUT as a Hugging Face folder (LoRA "
                    "merged). Checkpoints go to OUT/checkpoints; rerunning the same command "
                    "resumes from the latest one.")
    p.add_argument("--model", required=True, metavar="DIR", help="model folder (HF or Orbax)")
    p.add_argument("--data", required=True, metavar="FILE", help="training data, JSONL")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warmup steps before the cosine decay (default: 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-norm", type=float, default=1.0,
                   help="global gradient-norm clip (0: none; default 1.0)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step; must divide --batch-size (default 1)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per example; shorter ones are padded (default 512)")
    p.add_argument("--overflow", choices=OVERFLOW_POLICIES, default="truncate",
                   help="examples longer than --seq-len: truncate (with a warning) or error")
    p.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="LoRA rank; 0 (default) fine-tunes every weight")
    p.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="LoRA alpha; the update is scaled by A / R (default 2R)")
    p.add_argument("--lora-targets", default=",".join(TARGETS), metavar="NAMES",
                   help=f"projections to adapt (default {','.join(TARGETS)})")
    p.add_argument("--remat", action="store_true",
                   help="recompute layer activations in the backward pass (less memory)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype; trainable weights and optimizer state stay fp32")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the exported weights (default: --dtype)")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="checkpoint every N steps (default: only at the end)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load a base model whose weights hold NaN or infinity (refused by default)")
    quantize.add_arguments(p)  # QLoRA: with --lora-rank, the frozen base quantized
    sharding.add_mesh_argument(p)
    p.set_defaults(func=run)
