"""Compilation cost of generate(): cold, warm from the persistent cache, and after warm-up.

A fixed workload (prompt lengths spanning several buckets, batch 1 and a batch of 8, greedy,
max_new_tokens NEW) runs through the public `generate()` three times:
  1. cold, in a fresh process with an empty persistent compilation cache (jax's, enabled by
     generate(compilation_cache=DIR));
  2. again in the same process: what a warmed-up server pays (must compile nothing);
  3. warm start: a second fresh process on the same cache DIR;
  4. and 5. cold and warm start again (a new cache DIR), the way a server runs: one Engine
     sized for the workload (its rows, and a cache long enough for its longest prompt), whose
     `warmup()` builds every program it can run, in worker threads, before the same requests
     go through it (the warmup's own time is reported, and is in the wall; the requests after
     it must build nothing).
Each pass reports its wall time, the XLA programs it built (jax.monitoring's backend_compile
events, with their summed duration), how many of those came from the persistent cache, and the
time spent tracing to jaxprs and lowering to StableHLO: a warm start pays both for every program,
since the cache key is a hash of the lowered module.
Random bf16 weights are made on the device first (not counted; that init program is compiled
once per process).

    python benchmarks/bench_compile.py [--config mini|medium] [--out DIR]   # GPU
    python benchmarks/bench_compile.py --tiny                               # CPU smoke run
    python benchmarks/bench_compile.py --trace-only [--config ...]          # any backend

--trace-only times the host side alone, at the real shapes on abstract parameters (nothing is
allocated or compiled): tracing and lowering each program of the workload, the part of a warm
start that is Python (best of --repeats, jax's caches cleared before each).

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

NEW = 32
# (rows, prompt length): prefill buckets 128, 512, 1024, 2048 and a batch of 8.
WORKLOAD = [(1, 100), (1, 500), (1, 1000), (1, 2000), (8, 1000)]
TINY_WORKLOAD = [(1, 10), (2, 30)]
TINY_NEW = 16  # a CPU smoke run: fewer cache buckets, fewer programs


def run_passes(raw: dict, workload: list, new: int, cache_dir: str, passes: int,
               warmup: bool = False, buckets_per_octave: int = 2) -> list[dict]:
    import jax
    import numpy as np

    from benchmarks.bench_gpu import random_model
    from phi3_jax.api import Phi3
    from phi3_jax.compilation import bucket_length
    from phi3_jax.config import Phi3Config
    from phi3_jax.engine import Engine

    config = Phi3Config.from_hf(dict(raw, model_type="phi3"))
    graphdef, params = random_model(config)
    model = Phi3(config, graphdef, params, generation_config={})
    rs = np.random.RandomState(0)
    prompts = [[rs.randint(3, raw["vocab_size"] - 1, n).tolist() for _ in range(rows)]
               for rows, n in workload]
    settings = dict(max_new_tokens=new, temperature=0.0, ignore_eos=True)
    compiles: list[float] = []
    hits: list[str] = []
    # Top-level traces only (jax logs nested ones with no event), so the sums do not overlap.
    stages = {"/jax/core/compile/jaxpr_trace_duration": [],
              "/jax/core/compile/jaxpr_to_mlir_module_duration": []}

    def listener(name, duration, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)
        elif name in stages:
            stages[name].append(duration)

    def counter(name, **kwargs):
        if name == "/jax/compilation_cache/cache_hits":
            hits.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    jax.monitoring.register_event_listener(counter)
    out = []
    for _ in range(passes):
        compiles.clear()
        hits.clear()
        for durations in stages.values():
            durations.clear()
        t = time.perf_counter()
        warmup_s = request_programs = None
        if warmup:
            engine = Engine(model, max_slots=max(rows for rows, _ in workload),
                            max_len=bucket_length(max(n for _, n in workload) + new),
                            buckets_per_octave=buckets_per_octave,
                            compilation_cache=cache_dir)
            engine.warmup(prompt_logprobs=False)  # the workload asks for none
            warmup_s = time.perf_counter() - t
            built = len(compiles)
            for batch in prompts:
                for prompt in batch:
                    engine.submit(prompt, **settings)
                engine.run_until_done()
            request_programs = len(compiles) - built
        else:
            for batch in prompts:
                model.generate(batch, compilation_cache=cache_dir, **settings)
        # A program loaded from the persistent cache also reports a (short) backend compile.
        out.append(dict(wall_s=time.perf_counter() - t, warmup_s=warmup_s,
                        programs=len(compiles), request_programs=request_programs,
                        from_cache=len(hits), compile_s=sum(compiles),
                        trace_s=sum(stages["/jax/core/compile/jaxpr_trace_duration"]),
                        lower_s=sum(stages["/jax/core/compile/jaxpr_to_mlir_module_duration"])))
    jax.monitoring.unregister_event_duration_listener(listener)
    jax.monitoring.unregister_event_listener(counter)
    return out


def trace_only(raw: dict, workload: list, new: int, repeats: int) -> list[dict]:
    """Traces and lowers the programs `model.generate` runs for each workload item: its first
    prompt chunk, and its decode call at the read length the prompt's whole budget needs."""
    import jax
    import jax.numpy as jnp

    from benchmarks import engine_calls as calls
    from phi3_jax import generate as gen
    from phi3_jax.api import Phi3
    from phi3_jax.compilation import bucket_length
    from phi3_jax.config import Phi3Config
    from phi3_jax.engine import programs
    from phi3_jax.engine.scheduler import Shapes
    from phi3_jax.model import abstract_model

    config = Phi3Config.from_hf(dict(raw, model_type="phi3"))
    graphdef, params = abstract_model(config, jnp.bfloat16)
    model = Phi3(config, graphdef, params, generation_config={})
    rows = []
    for n, prompt_len in workload:
        # generate()'s engine for n prompts of prompt_len tokens.
        B = min(1 << (n - 1).bit_length(), gen.MAX_SLOTS)
        S = bucket_length(prompt_len + new)
        shapes = Shapes(B, S, 512, gen.DECODE_STEPS, 0)  # no logprobs asked for
        chunk = shapes.chunks(prompt_len)[0]
        prefill = calls.abstract_prefill(model, B, chunk.T, S)
        decode = calls.abstract_decode(model, B, S, gen.DECODE_STEPS,
                                       read_len=shapes.read_len(prompt_len + new)).call_args()
        for name, fn, (args, kwargs) in (("prefill", programs.prefill, prefill),
                                         ("decode", programs.decode, decode)):
            best = None
            for _ in range(repeats):
                jax.clear_caches()
                t0 = time.perf_counter()
                traced = fn.trace(*args, **kwargs)
                t1 = time.perf_counter()
                traced.lower()
                t2 = time.perf_counter()
                if best is None or t2 - t0 < best[0] + best[1]:
                    best = (t1 - t0, t2 - t1)
            rows.append(dict(program=name, B=B if name == "decode" else 1,
                             T=chunk.T if name == "prefill" else 1, S=S,
                             trace_s=best[0], lower_s=best[1]))
    return rows


def child(args: argparse.Namespace, cache_dir: str, passes: int,
          warmup: bool = False) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", cache_dir, "--passes",
           str(passes), "--config", args.config] + (["--tiny"] if args.tiny else []) + (
               ["--warmup"] if warmup else [])
    env = dict(os.environ, JAX_PLATFORMS="cpu") if args.tiny else dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small config on the CPU")
    p.add_argument("--config", choices=["mini", "medium"], default="mini")
    p.add_argument("--out", default=None)
    p.add_argument("--trace-only", action="store_true",
                   help="time tracing and lowering only, at real shapes (any backend)")
    p.add_argument("--repeats", type=int, default=3, help="--trace-only: best of N")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--passes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    from benchmarks.bench_gpu import MEDIUM, MINI, TINY, git_head
    from benchmarks.machine import print_result

    raw = TINY if args.tiny else (MEDIUM if args.config == "medium" else MINI)
    workload = TINY_WORKLOAD if args.tiny else WORKLOAD
    new = TINY_NEW if args.tiny else NEW
    if args.child:
        # --tiny: one bucket per octave halves the engine's programs (a CPU smoke run).
        print(json.dumps(run_passes(raw, workload, new, args.child, args.passes, args.warmup,
                                    buckets_per_octave=1 if args.tiny else 2)))
        return 0
    if args.trace_only:
        import jax

        rows = trace_only(raw, workload, new, args.repeats)
        print(f"{'program':8} {'B':>3} {'T':>5} {'S':>5} {'trace s':>8} {'lower s':>8}")
        for r in rows:
            print(f"{r['program']:8} {r['B']:3d} {r['T']:5d} {r['S']:5d} {r['trace_s']:8.3f} "
                  f"{r['lower_s']:8.3f}")
        result = {"bench": "compile_trace_only", "tiny": args.tiny, "config": args.config,
                  "backend": jax.default_backend(), "new": new, "commit": git_head(),
                  "rows": rows, "total_s": sum(r["trace_s"] + r["lower_s"] for r in rows)}
        print_result(result, args.out, "bench_compile_trace.json")
        return 0
    with tempfile.TemporaryDirectory(prefix="phi3_jax_cc_") as cache_dir:
        cold, steady = child(args, cache_dir, passes=2)
        (warm,) = child(args, cache_dir, passes=1)
    with tempfile.TemporaryDirectory(prefix="phi3_jax_cc_") as cache_dir:
        (cold_w,) = child(args, cache_dir, passes=1, warmup=True)
        (warm_w,) = child(args, cache_dir, passes=1, warmup=True)
    rows = [dict(run="cold start (empty cache)", **cold),
            dict(run="same process again", **steady),
            dict(run="warm start (persistent cache)", **warm),
            dict(run="cold start, warmup() first", **cold_w),
            dict(run="warm start, warmup() first", **warm_w)]
    print(f"{'run':32} {'wall s':>8} {'warmup s':>8} {'programs':>9} {'by requests':>11} "
          f"{'from cache':>10} {'compile s':>10} {'trace s':>8} {'lower s':>8}")
    for r in rows:
        warmup_s = f"{r['warmup_s']:8.2f}" if r["warmup_s"] is not None else f"{'':8}"
        by_requests = r["request_programs"] if r["request_programs"] is not None else ""
        print(f"{r['run']:32} {r['wall_s']:8.2f} {warmup_s} {r['programs']:9d} "
              f"{by_requests:>11} "
              f"{r['from_cache']:10d} {r['compile_s']:10.2f} {r['trace_s']:8.2f} "
              f"{r['lower_s']:8.2f}")
    result = {"bench": "compile", "tiny": args.tiny, "config": args.config, "new": new,
              "workload": workload, "commit": git_head(), "rows": rows,
              # Compilation the warm start saves: cold minus warm wall time.
              "warm_saving_s": cold["wall_s"] - warm["wall_s"]}
    print_result(result, args.out, "bench_compile.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
