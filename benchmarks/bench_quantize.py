"""Weight-only int8/int4 (phi3_jax.quantize) against bf16: quality, task accuracy, QLoRA, speed.

- Quality: KL(bf16 || quantized) of the next-token distributions, and top-1 agreement, over
  every position of the embedded model's 90 held-out problems (chat-formatted, with answers)
  and over random tokens on a random Phi-3-mini-width model (4 layers, real D, F and V).
- Accuracy: the embedded model's held-out problems solved (greedy), dense, int8, int4.
- QLoRA: LoRA (rank 16) on the bf16 embedded base and on its int4 base, the same start,
  data (training-split problems) and steps; held-out accuracy of each exported model.
- Speed: batch-1 decode of the mini-width model, bf16 vs int8 vs int4 in one run, ms per step
  (median), and the step's compiled temporaries next to the largest dense weight: the
  quantized steps must never build a full-size weight.

    python benchmarks/bench_quantize.py [--steps 40] [--decode-steps 12] [--skip-train]

Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import numpy as np

# The working tree's phi3_jax, not an installed copy (which may be stale).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
from flax import nnx

import phi3_jax
from benchmarks.machine import cpu_model
from phi3_jax import quantize
from phi3_jax.attention import choose_kernels
from phi3_jax.cache import CacheUpdate, KVCache
from phi3_jax.compilation import StaticGraph
from phi3_jax.config import Phi3Config
from phi3_jax.embedded import MODEL_DIR, task
from phi3_jax.model import Phi3ForCausalLM

MINI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                    "configs", "phi3_mini_4k.json")
SCHEMES = ("int8", "int4")
# Mini-width variants: the bf16 head converts to fp32 inside XLA's CPU dot (a full-size
# temporary of its own); "+emb" quantizes it too, leaving no full-size temporary at all.
MINI_VARIANTS = {"int8": quantize.Quantization("int8"), "int4": quantize.Quantization("int4"),
                 "int4+emb": quantize.Quantization("int4", embeddings=True)}
CONTEXT = 256  # decode steps read a cache of this many slots


def kl_top1(ref: np.ndarray, other: np.ndarray, mask: np.ndarray) -> dict:
    """Mean KL(ref || other) in nats and top-1 agreement over the positions in mask."""
    p = jax.nn.log_softmax(jnp.asarray(ref, jnp.float32), -1)
    q = jax.nn.log_softmax(jnp.asarray(other, jnp.float32), -1)
    kl = np.asarray(jnp.sum(jnp.exp(p) * (p - q), -1))[mask]
    agree = (np.argmax(ref, -1) == np.argmax(other, -1))[mask]
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()), "top1": float(agree.mean())}


# ---------------------------------------------------------------------------- embedded model

def held_out_batch(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    rows = [tokenizer.encode_chat(p.messages(), add_generation_prompt=False)
            for p in task.held_out_problems()]
    T = max(map(len, rows))
    ids = np.zeros((len(rows), T), np.int32)
    mask = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, True
    return ids, mask


def solved(model: phi3_jax.Phi3) -> int:
    problems = task.held_out_problems()
    outs = model.generate([p.messages(with_answer=False) for p in problems], max_new_tokens=8)
    return sum(task.parse_answer(o.text) == p.x for o, p in zip(outs, problems, strict=True))


def embedded_quality() -> dict:
    dense = phi3_jax.load(MODEL_DIR, dtype="bfloat16")
    ids, mask = held_out_batch(dense.tokenizer)
    ref = np.asarray(dense.logits(ids, mask), np.float32)
    out = {"dense_solved": solved(phi3_jax.load(MODEL_DIR))}
    for scheme in SCHEMES:
        q = phi3_jax.load(MODEL_DIR, dtype="bfloat16", quantize=scheme)
        out[scheme] = kl_top1(ref, np.asarray(q.logits(ids, mask), np.float32), mask)
        out[scheme]["solved"] = solved(phi3_jax.load(MODEL_DIR, quantize=scheme))
        q = phi3_jax.load(MODEL_DIR, dtype="bfloat16", quantize=scheme, quantize_embeddings=True)
        out[scheme + "+emb"] = kl_top1(ref, np.asarray(q.logits(ids, mask), np.float32), mask)
    return out


def qlora(steps: int, work: str) -> dict:
    """LoRA on the bf16 base against QLoRA on the int4 base: same start, data and steps."""
    from phi3_jax.train import FinetuneConfig, finetune

    triples = task.split()[0]
    rng = np.random.RandomState(0)
    data = os.path.join(work, "train.jsonl")
    with open(data, "w") as f:
        for i in rng.permutation(len(triples))[:512]:
            a, b, x = triples[i]
            problem = task.Problem(a, b, x, int(rng.randint(len(task.FORMATS))))
            f.write(json.dumps({"messages": problem.messages()}) + "\n")
    out = {"int4_base_solved": solved(phi3_jax.load(MODEL_DIR, quantize="int4"))}
    for name, extra in (("lora_bf16", {}), ("qlora_int4", {"quantize": "int4"})):
        config = FinetuneConfig(steps=steps, batch_size=16, seq_len=48, learning_rate=1e-3,
                                lora_rank=16, dtype="bfloat16", seed=0, **extra)
        start = time.perf_counter()
        result = finetune(MODEL_DIR, data, os.path.join(work, name), config, progress=False)
        out[name] = {"solved": solved(phi3_jax.load(os.path.join(work, name))),
                     "final_loss": result.losses[steps],
                     "seconds": time.perf_counter() - start}
    return out


# ---------------------------------------------------------------------------- mini width

def mini_model(layers: int) -> Phi3ForCausalLM:
    with open(MINI) as f:
        config = Phi3Config.from_hf({**json.load(f), "num_hidden_layers": layers})
    return Phi3ForCausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
                           kernels=choose_kernels("auto", jnp.bfloat16))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def decode_step(graph: StaticGraph, params, cache: KVCache, token: jax.Array,
                position: jax.Array):
    """One greedy batch-1 decode step over a CONTEXT-slot cache."""
    model = nnx.merge(graph.graphdef, params)
    logits, cache = model(token[:, None], position[:, None], cache,
                          CacheUpdate(starts=position, read_len=CONTEXT))
    return jnp.argmax(logits[:, -1], -1).astype(jnp.int32), cache


def time_decode(model: Phi3ForCausalLM, steps: int) -> dict:
    graphdef, params = nnx.split(model)
    graph = StaticGraph(graphdef)
    config = model.config
    cache = KVCache.init(config, 1, CONTEXT, jnp.bfloat16)
    token, position = jnp.zeros((1,), jnp.int32), jnp.full((1,), 16, jnp.int32)
    compiled = decode_step.lower(graph, params, cache, token, position).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    times = []
    for i in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        token, cache = decode_step(graph, params, cache, token, position + i)
        token.block_until_ready()
        times.append(time.perf_counter() - start)
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    return {"ms_per_step": 1e3 * float(np.median(times[2:])), "temp_bytes": int(temp),
            "weight_bytes": int(weights)}


def mini_width(layers: int, decode_steps: int) -> dict:
    dense = mini_model(layers)
    config = dense.config
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randint(0, config.vocab_size, (2, 64)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(64), (2, 64))
    forward = jax.jit(lambda m, t, p: m(t, p)[0])
    ref = np.asarray(forward(dense, tokens, positions), np.float32)
    mask = np.ones(ref.shape[:2], bool)
    D, F = config.hidden_size, config.intermediate_size
    out = {"largest_dense_weight_bytes_bf16": D * 2 * F * 2,
           "bf16": time_decode(dense, decode_steps)}
    for name, quantization in MINI_VARIANTS.items():
        q = quantize.quantize_model(nnx.clone(dense), quantization, "blocked")
        out[name] = {**kl_top1(ref, np.asarray(forward(q, tokens, positions), np.float32),
                                 mask), **time_decode(q, decode_steps)}
        del q
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="LoRA/QLoRA steps (default 40)")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4, help="mini-width model's layers")
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()

    embedded = embedded_quality()
    print("| embedded model (bf16 reference) | KL (nats) | top-1 | held-out solved (of 90) |")
    print("|---|---:|---:|---:|")
    print(f"| dense | 0 | 100% | {embedded['dense_solved']} |")
    for key in ("int8", "int8+emb", "int4", "int4+emb"):
        r = embedded[key]
        print(f"| {key} | {r['kl']:.2e} | {100 * r['top1']:.1f}% | {r.get('solved', '')} |")

    train = None
    if not args.skip_train:
        with tempfile.TemporaryDirectory() as work:
            train = qlora(args.steps, work)
        print(f"\nint4 base before training: {train['int4_base_solved']}/90")
        for name in ("lora_bf16", "qlora_int4"):
            r = train[name]
            print(f"{name}: {r['solved']}/90 held out, final loss {r['final_loss']:.4f}, "
                  f"{r['seconds']:.0f} s")

    mini = mini_width(args.layers, args.decode_steps)
    big = mini["largest_dense_weight_bytes_bf16"]
    print(f"\n| mini width, {args.layers} layers | KL (nats) | top-1 | decode ms/step (B=1) "
          f"| weights | compiled temporaries |")
    print("|---|---:|---:|---:|---:|---:|")
    for key in ("bf16", *MINI_VARIANTS):
        r = mini[key]
        kl = "0" if key == "bf16" else f"{r['kl']:.2e}"
        top1 = "100%" if key == "bf16" else f"{100 * r['top1']:.1f}%"
        print(f"| {key} | {kl} | {top1} | {r['ms_per_step']:.1f} | "
              f"{r['weight_bytes'] / 2**20:.0f} MiB | {r['temp_bytes'] / 2**20:.1f} MiB |")
    print(f"(largest dense weight, gate_up in bf16: {big / 2**20:.0f} MiB)")
    print(json.dumps({"benchmark": "bench_quantize", "jax": jax.__version__,
                      "backend": jax.default_backend(), "cpu": cpu_model(),
                      "cores": os.cpu_count(), "embedded": embedded, "train": train,
                      "mini_width": mini}))


if __name__ == "__main__":
    main()
