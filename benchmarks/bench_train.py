"""Training throughput and MFU of the phi3_jax train step (LoRA and full fine-tuning, remat).

Random weights of the chosen shape are built on the device (no checkpoint needed), then the
jitted train step of phi3_jax.train (the one `phi3-jax finetune` runs: fp32 master weights and
AdamW state, compute in --dtype, loss in fp32) is warmed up (compilation) and timed over --steps
calls with block_until_ready. Batches are random token ids, every token a target.

MFU counts model FLOPs only (no rematerialisation), PaLM-style:
    full:  6 N + 12 L T D  per token        LoRA:  4 N + 12 L T D  per token
with N the matmul weights (projections and head; LoRA skips the 2 N of weight gradients) and
T the sequence length; divided by --peak-tflops (H100 SXM dense bf16: 989).

--attention both times each mode twice: with the attention training takes ("kernels": cuDNN's
fused attention on GPUs in bf16/fp16, else the blocked attention with its flash backward from
512 tokens) and with the plain XLA reference ("reference": [B, N, T, T] fp32 scores, kept for
the backward pass). --loss both does the same for the loss: "chunked" (head_loss_sum, what
training runs: the head and loss a chunk of positions at a time, recomputed in the backward
pass) against "full" ([B, T, V] logits and their fp32 copies). "temp GiB" is the compiled
step's scratch memory (XLA's memory analysis, on any backend); "peak GiB" the device
allocator's peak where it reports one (GPUs). --compile-only builds the step on abstract
state (nothing allocated, nothing run) and reports the scratch memory alone: real shapes on
any machine.

Prints a table, then one JSON line.

    python benchmarks/bench_train.py                         # Phi-3-mini shapes, lora + full
    python benchmarks/bench_train.py --config tiny --peak-tflops 1   # CPU smoke run
    python benchmarks/bench_train.py --config small --modes full --batch 1 --seq 4096 \
        --dtype float32 --attention both --steps 3 --peak-tflops 1     # CPU: attention
    python benchmarks/bench_train.py --config phi4mini --modes full --batch 4 --seq 2048 \
        --loss both --compile-only                                     # memory, any machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from phi3_jax.attention import choose_kernels
from phi3_jax.config import Phi3Config
from phi3_jax.model import Phi3ForCausalLM
from phi3_jax.train import step as train_step
from phi3_jax.train.lora import LoRAConfig
from phi3_jax.train.loss import token_loss_sum
from phi3_jax.train.optim import OptimConfig, make_optimizer
from phi3_jax.train.step import (
    build_model_spec,
    init_lora_params,
    init_train_state,
    make_train_step,
)

CONFIGS = {
    "mini": dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, sliding_window=2047),
    "phi4mini": dict(vocab_size=200064, hidden_size=3072, intermediate_size=8192,
                     num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                     max_position_embeddings=131072, partial_rotary_factor=0.75,
                     tie_word_embeddings=True),
    # A CPU-sized model with Phi-3-mini's head dim (8 heads of 96).
    "small": dict(vocab_size=1024, hidden_size=768, intermediate_size=2048, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=16384),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
}


def matmul_params(c: Phi3Config) -> int:
    D, F, V, L = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    qkv = D * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    per_layer = qkv + c.num_attention_heads * c.head_dim * D + 2 * D * F + F * D
    return L * per_layer + V * D  # the head; the embedding is a lookup


def flops_per_token(c: Phi3Config, seq: int, lora: bool) -> float:
    attention = 12 * c.num_hidden_layers * seq * c.hidden_size
    return (4 if lora else 6) * matmul_params(c) + attention


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


CHUNKED_LOSS = train_step.head_loss_sum


def full_logits_loss(x, head, labels):
    """The loss on whole [B, T, V] logits: what the train step computed before head_loss_sum."""
    return token_loss_sum(head(x), labels)


def run_mode(config: Phi3Config, mode: str, args: argparse.Namespace,
             kind: str = "kernels", loss: str = "chunked") -> dict:
    dtype = jnp.dtype(args.dtype)
    lora = LoRAConfig(args.lora_rank, 2.0 * args.lora_rank) if mode == "lora" else None
    remat = args.remat
    # The reference: the plain XLA attention, with its [B, N, T, T] scores kept for backward.
    kernels = choose_kernels("xla" if kind == "reference" else "auto", dtype)
    spec, _, _ = build_model_spec(config, dtype, remat=remat, lora=lora, kernels=kernels)
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-5, total_steps=1000,
                                           warmup_steps=10))
    # Base weights straight on the device: fp32 masters for full fine-tuning, the compute
    # dtype for LoRA's frozen base. Abstract ones (shapes only) with --compile-only.
    base_dtype = jnp.float32 if lora is None else dtype
    make = jax.eval_shape if args.compile_only else (lambda f, *a: jax.jit(f)(*a))
    base = make(lambda: nnx.split(Phi3ForCausalLM(config, dtype=base_dtype, rngs=nnx.Rngs(0)),
                                  nnx.Param)[1].to_pure_dict())
    if lora is None:
        frozen = None
        if args.compile_only:
            state = jax.eval_shape(lambda b: init_train_state(optimizer, b, 0), base)
        else:  # the fp32 masters take the base's buffers: one copy of the weights, not two
            state = init_train_state(optimizer, base, 0, donate=True)
        del base
    else:
        frozen = base
        state = make(lambda: init_train_state(optimizer, init_lora_params(config, lora, 0), 0))
    step = make_train_step(spec, optimizer)
    rs = np.random.RandomState(0)
    B, T = args.batch, args.seq
    ids = rs.randint(0, config.vocab_size, (1, B, T)).astype(np.int32)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(ids),
             "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (1, B, T))}
    t0 = time.perf_counter()
    if loss == "full":
        train_step.head_loss_sum = full_logits_loss
    try:
        step = step.lower(state, frozen, batch).compile()
    finally:
        train_step.head_loss_sum = CHUNKED_LOSS
    temp = step.memory_analysis()
    temp_gib = temp.temp_size_in_bytes / 2**30 if temp is not None else None
    if args.compile_only:
        return {"mode": mode, "attention": kind, "loss_impl": loss, "remat": remat, "batch": B,
                "seq": T, "temp_gib": temp_gib, "compile_s": time.perf_counter() - t0}
    for _ in range(args.warmup):
        state, metrics = step(state, frozen, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, frozen, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / args.steps
    tokens_s = B * T / step_s
    mfu = tokens_s * flops_per_token(config, T, lora is not None) / (args.peak_tflops * 1e12)
    trainable = sum(x.size for x in jax.tree.leaves(state.params))
    memory = None
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        memory = stats["peak_bytes_in_use"] / 2**30
    return {"mode": mode, "attention": kind, "loss_impl": loss, "remat": remat, "batch": B,
            "seq": T, "step_ms": 1e3 * step_s, "temp_gib": temp_gib,
            "tokens_per_s": tokens_s, "mfu": mfu, "trainable_params": trainable,
            "loss": float(metrics["loss"]), "warmup_s": compile_s, "peak_gib": memory}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="mini")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--no-remat", dest="remat", action="store_false")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--attention", choices=["kernels", "reference", "both"], default="kernels",
                   help="training's attention kernels, the XLA reference, or both in turn")
    p.add_argument("--loss", choices=["chunked", "full", "both"], default="chunked",
                   help="training's chunked head + loss, whole logits, or both in turn")
    p.add_argument("--compile-only", action="store_true",
                   help="compile on abstract state and report scratch memory; run nothing")
    args = p.parse_args()
    raw = dict(CONFIGS[args.config])
    if args.layers:
        raw["num_hidden_layers"] = args.layers
    config = Phi3Config(**raw)
    rows = []
    kinds = ["kernels", "reference"] if args.attention == "both" else [args.attention]
    losses = ["chunked", "full"] if args.loss == "both" else [args.loss]
    for mode in args.modes.split(","):
        for kind in kinds:
            for loss in losses:
                try:
                    rows.append(run_mode(config, mode, args, kind, loss))
                except Exception as e:  # an OOM in one run should not hide the others
                    rows.append({"mode": mode, "attention": kind, "loss_impl": loss,
                                 "error": f"{type(e).__name__}: {str(e)[:200]}"})
                jax.clear_caches()
    device = jax.devices()[0]
    print(f"device {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"config {args.config} ({config.num_hidden_layers} layers), dtype {args.dtype}")
    print(f"{'mode':6} {'attention':9} {'loss':7} {'remat':5} {'B x T':>10} {'step ms':>9} "
          f"{'tokens/s':>10} {'MFU':>6} {'temp GiB':>8} {'peak GiB':>8}")
    for r in rows:
        head = f"{r['mode']:6} {r['attention']:9} {r['loss_impl']:7}"
        if "error" in r:
            print(f"{head} failed: {r['error']}")
            continue
        temp = f"{r['temp_gib']:.2f}" if r["temp_gib"] is not None else "-"
        if args.compile_only:
            print(f"{head} {r['remat']!s:5} {r['batch']:>4} x {r['seq']:<5}{'-':>9} {'-':>10} "
                  f"{'-':>6} {temp:>8} {'-':>8}")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{head} {r['remat']!s:5} {r['batch']:>4} x {r['seq']:<5}{r['step_ms']:>9.1f} "
              f"{r['tokens_per_s']:>10,.0f} {r['mfu']:>6.1%} {temp:>8} {peak:>8}")
    print(json.dumps({"bench": "train", "device": device.device_kind,
                      "backend": jax.default_backend(), "jax": jax.__version__,
                      "commit": git_head(), "config": args.config,
                      "layers": config.num_hidden_layers, "dtype": args.dtype,
                      "peak_tflops": args.peak_tflops, "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
