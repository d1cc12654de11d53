"""Prefill attention on the XLA path: the reference (`dot_product_attention`, [B, N, T, T] fp32
scores) against `blocked_causal_attention` (key blocks, online softmax, causal blocks skipped),
one layer's attention alone at Phi-3-mini's heads (32 x 96), right-padded full rows.

Each case reports the median time of a few calls and the compiled temporaries
(`memory_analysis`). The reference is skipped where its scores would not fit (--max-scores-gib);
the blocked form runs at every length. Any backend; CPU is where it matters (on GPUs bf16
prefills take cuDNN's fused kernel).

    python benchmarks/bench_prefill_attention.py [--lengths 1024 2048 4096] [--blocks 256 512]
    python benchmarks/bench_prefill_attention.py --tiny        # CI smoke run

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_gpu import git_head
from benchmarks.machine import cpu_model, print_result
from phi3_jax.attention import (
    PREFILL_BLOCK,
    attention_mask,
    blocked_causal_attention,
    dot_product_attention,
)


def measure(fn, args: tuple, runs: int) -> tuple[float, float, np.ndarray]:
    """(median ms, compiled temporaries in MiB, the output) of jit(fn)(*args)."""
    compiled = jax.jit(fn).lower(*args).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, temp, np.asarray(out, np.float32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small heads and lengths (CI)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--blocks", type=int, nargs="+", default=[256, PREFILL_BLOCK, 1024])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-scores-gib", type=float, default=8.0,
                   help="skip the reference where its fp32 scores would exceed this")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    K, G, H = (2, 2, 16) if args.tiny else (32, 1, 96)
    lengths, blocks = ([64, 128], [16, 32]) if args.tiny else (args.lengths, args.blocks)
    dtype = jnp.dtype(args.dtype)
    B = args.batch
    rs = np.random.RandomState(0)
    rows = []
    print(f"{'T':>6} {'impl':>14} {'ms':>9} {'temp MiB':>9} {'max |diff|':>11}")
    for T in lengths:
        q = jnp.asarray(rs.normal(size=(B, T, K, G, H)), dtype)
        k = jnp.asarray(rs.normal(size=(B, T, K, H)), dtype)
        v = jnp.asarray(rs.normal(size=(B, T, K, H)), dtype)
        lengths_b = jnp.full((B,), T, jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        impls = {}
        mask = attention_mask(pos, pos, args.window)
        if args.max_scores_gib >= B * K * G * T * T * 4 / 2**30:
            impls["reference"] = lambda q, k, v, mask=mask: dot_product_attention(q, k, v, mask)
        for block in blocks:
            impls[f"blocked {block}"] = (
                lambda q, k, v, block=block, lengths=lengths_b: blocked_causal_attention(
                    q, k, v, lengths, args.window, block))
        ref = None
        for name, fn in impls.items():
            ms, temp, out = measure(fn, (q, k, v), args.runs)
            ref = out if name == "reference" else ref
            diff = float(np.abs(out - ref).max()) if ref is not None else None
            row = dict(T=T, impl=name, ms=ms, temp_mib=temp, max_abs_diff=diff)
            rows.append(row)
            print(f"{T:6d} {name:>14} {ms:9.1f} {temp:9.1f} "
                  f"{'' if diff is None else f'{diff:11.2e}'}", flush=True)
    result = {"bench": "prefill_attention", "tiny": args.tiny, "batch": B, "heads": [K, G, H],
              "dtype": args.dtype, "window": args.window, "backend": jax.default_backend(),
              "device": cpu_model() if jax.default_backend() == "cpu" else
              jax.devices()[0].device_kind, "cores": os.cpu_count(),
              "loadavg_1m": os.getloadavg()[0], "jax": jax.__version__, "commit": git_head(),
              "rows": rows}
    print_result(result, args.out, "bench_prefill_attention.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
