"""Diagnosis (GPU): compiled memory of the generator's prefill under each attention path, and
batch-64 decode with the einsum vs the block-diagonal matmul attention (Phi-3-mini, bf16).

The prefill rows only compile (`memory_analysis`), so a variant that would not fit still
reports its size; "cudnn" forces the fused kernel past attention.CUDNN_PREFILL_MAX_TOKENS.
The attention choice is made at trace time, so jax's caches are cleared between variants (the
first recorded run, stop 9, missed this and its cuDNN rows repeated the XLA trace).

    python benchmarks/prefill_memory.py
Prints one line per case, then one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_gpu import MINI, random_model
from phi3_jax import attention
from phi3_jax import generate as gen
from phi3_jax.config import Phi3Config


def main() -> int:
    config = Phi3Config(**dict(MINI, eos_token_id=(MINI["eos_token_id"],)))
    graphdef, params = random_model(config)
    sampler, stop, pad = gen.make_sampler(0.0), jnp.full((8,), -1, jnp.int32), jnp.asarray(0)
    rows = []

    def prefill_args(B, T, S):
        tokens = jnp.asarray(np.random.RandomState(0).randint(3, 32000, (B, T)), jnp.int32)
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        plan = gen._Plan(cache_len=S, always_long=False, reprefill=False)
        return (graphdef, params, tokens, pos, jnp.full((B,), S, jnp.int32), sampler, stop, pad,
                jnp.asarray(0, jnp.uint32)), plan

    real_prefill = attention.prefill_impl
    for impl in ("xla", "cudnn"):
        os.environ[attention.ATTENTION_ENV] = "xla"
        attention.prefill_impl = lambda dtype, batch=1, length=1, impl=impl: impl
        jax.clear_caches()
        for B, T, S in ((64, 960, 1024), (8, 2048, 2048), (1, 2048, 2112)):
            args, plan = prefill_args(B, T, S)
            m = gen._prefill.lower(*args, plan=plan).compile().memory_analysis()
            row = dict(case="prefill", impl=impl, B=B, T=T, S=S,
                       temp_gib=m.temp_size_in_bytes / 2**30,
                       out_gib=m.output_size_in_bytes / 2**30)
            rows.append(row)
            print(row, flush=True)
    attention.prefill_impl = real_prefill
    jax.clear_caches()
    args, plan = prefill_args(64, 960, 1024)
    real = attention.decode_impl
    for impl in ("einsum", "matmul"):
        state = gen._prefill(*args, plan=plan)
        attention.decode_impl = lambda batch=1, impl=impl: impl
        jax.clear_caches()

        def decode(state, end):
            return gen._decode(graphdef, params, state, sampler, stop, pad,
                               jnp.asarray(end, jnp.int32), plan=plan)

        m = gen._decode.lower(graphdef, params, state, sampler, stop, pad,
                              jnp.asarray(2, jnp.int32), plan=plan).compile().memory_analysis()
        state = jax.block_until_ready(decode(state, 2))
        t = time.perf_counter()
        state = jax.block_until_ready(decode(state, 18))
        row = dict(case="decode", impl=impl, B=64, ctx=1024,
                   ms=(time.perf_counter() - t) / 16 * 1e3,
                   temp_gib=m.temp_size_in_bytes / 2**30)
        rows.append(row)
        print(row, flush=True)
        del state
    attention.decode_impl = real
    print(json.dumps({"bench": "prefill_memory", "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
