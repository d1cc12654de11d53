"""Diagnosis (GPU): compiled memory of the engine's prompt-chunk program (Phi-3-mini shapes,
bf16), per attention path, with and without the per-layer barrier of model.hidden_states.

Compile only, on abstract parameters (nothing is allocated, so a variant that would not fit
still reports its size): temporaries and outputs (the cache) from `memory_analysis`, and the
temporaries per prompt token per layer. Each variant forces its attention path; the choice and
the barrier are read at trace time, so jax's caches are cleared between variants.

    python benchmarks/prefill_memory.py [--layers 8] [--out DIR]    # GPU
    python benchmarks/prefill_memory.py --tiny                      # CPU smoke run

Prints one line per case, then one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp

from benchmarks.bench_gpu import MINI, TINY
from benchmarks.engine_calls import abstract_prefill
from benchmarks.machine import print_result
from phi3_jax.api import Phi3
from phi3_jax.attention import Kernels
from phi3_jax.config import Phi3Config
from phi3_jax.engine import programs
from phi3_jax.model import abstract_model

# (B, T, S): a first chunk of T tokens (the engine prefills one prompt at a time, in chunks
# of at most its prefill_chunk) into a cache of B rows and S slots: the default chunk with
# many rows, and long single chunks (an engine built with a larger prefill_chunk).
CASES = [(64, 512, 1024), (16, 512, 4096), (1, 4096, 4096), (1, 32768, 32768)]
TINY_CASES = [(2, 32, 64), (1, 256, 256)]


def prefill_memory(config: Phi3Config, B: int, T: int, S: int, impl: str) -> dict:
    kernels = Kernels(prefill=impl, decode="einsum", two_row_gemv=False)
    graphdef, params = abstract_model(config, jnp.bfloat16, kernels)
    model = Phi3(config, graphdef, params, generation_config={})
    args, kwargs = abstract_prefill(model, B, T, S)
    m = programs.prefill.lower(*args, **kwargs).compile().memory_analysis()
    return dict(temp_gib=m.temp_size_in_bytes / 2**30, out_gib=m.output_size_in_bytes / 2**30,
                temp_kib_per_token_layer=m.temp_size_in_bytes / 1024 / T
                / config.num_hidden_layers)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--layers", type=int, default=8, help="decoder layers (memory per layer)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    raw = TINY if args.tiny else MINI
    config = Phi3Config(**dict(raw, eos_token_id=(raw["eos_token_id"],),
                               num_hidden_layers=args.layers))
    impls = ("xla",) if args.tiny else ("xla", "cudnn")
    real_barrier = jax.lax.optimization_barrier
    rows = []
    try:
        for impl in impls:
            for barrier in (True, False):
                jax.lax.optimization_barrier = real_barrier if barrier else (lambda x: x)
                jax.clear_caches()
                for B, T, S in TINY_CASES if args.tiny else CASES:
                    row = dict(impl=impl, barrier=barrier, B=B, T=T, S=S,
                               layers=args.layers)
                    try:
                        row.update(prefill_memory(config, B, T, S, impl))
                    except Exception as e:  # a compile that fails still says why
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    rows.append(row)
                    print(row, flush=True)
    finally:
        jax.lax.optimization_barrier = real_barrier
    print_result({"bench": "prefill_memory", "device": jax.devices()[0].device_kind,
                  "jax": jax.__version__, "rows": rows}, args.out, "prefill_memory.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
