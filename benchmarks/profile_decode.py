"""Where a decode step's time goes: a kernel-level profile of the generator's decode loop.

Builds random bf16 weights at Phi-3-mini's shapes on the device, prefills a tight cache
(prompt ctx-64 tokens, ctx slots, as bench_gpu.py's decode_tight), times the engine's decode
program (its `lax.while_loop`, called through benchmarks/engine_calls.py), then records STEPS
steps under `jax.profiler.trace` and sums the device kernels of the trace by name. Printed per
decode step: wall ms, kernel-busy ms (the rest is launch gaps and host syncs), and the top
kernels with their bytes-equivalent bandwidth where the kernel is a weight matmul.

Also times XLA's matrix-vector products alone (the decode step's weight reads): LAYERS distinct
weights per shape (more than fits in L2), x [B, in] @ W, with W stored [in, out] (our layout)
and [out, in], as achieved TB/s.

    python benchmarks/profile_decode.py [--batch 1 64] [--ctx 1024] [--out DIR]
    python benchmarks/profile_decode.py --tiny      # CPU smoke run

Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp

from benchmarks import engine_calls as calls
from benchmarks.bench_gpu import BW_TBS, MINI, NEW, TINY, counts, decode_bytes, random_model
from benchmarks.machine import print_result
from phi3_jax.api import Phi3
from phi3_jax.config import Phi3Config


def trace_events(log_dir: str) -> list[dict]:
    """The complete ("X") events of the perfetto trace jax.profiler wrote, each with the
    names of its process and thread."""
    files = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        return []
    with gzip.open(files[0], "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    procs, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"].get("name", "")
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e.get("tid"))] = e["args"].get("name", "")
    out = []
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            out.append(dict(name=e.get("name", ""), dur_us=float(e["dur"]), ts=float(e["ts"]),
                            proc=procs.get(e["pid"], str(e["pid"])),
                            thread=threads.get((e["pid"], e.get("tid")), str(e.get("tid")))))
    return out


def device_kernels(events: list[dict]) -> list[dict]:
    """Kernel events on the GPU's streams (not the 'XLA Ops'/'XLA Modules' summary lines)."""
    gpu = [e for e in events if "/device:GPU" in e["proc"]]
    streams = [e for e in gpu if "Stream" in e["thread"]]
    return streams or gpu


def summarise(kernels: list[dict], steps: int, top: int = 25) -> list[dict]:
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for k in kernels:
        by_name[k["name"]].append(k["dur_us"])
    total = sum(sum(v) for v in by_name.values())
    rows = [dict(kernel=name[:90], calls_per_step=len(v) / steps, us_per_step=sum(v) / steps,
                 share=sum(v) / total if total else 0.0) for name, v in by_name.items()]
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:top]


def decode_profile(raw: dict, model: Phi3, batch: int, ctx: int, steps: int,
                   out_dir: str | None, hlo: bool = False) -> dict:
    c = counts(raw)
    rs = np.random.RandomState(0)
    P = ctx - NEW
    prompts = rs.randint(3, raw["vocab_size"] - 1, (batch, P)).astype(np.int32)
    cache, seen = calls.new_state(model, batch, ctx)
    cache, seen, first = calls.prefill_rows(model, cache, seen, prompts)
    run = calls.DecodeRun(model, cache, seen, first, P, read_len=ctx, max_steps=steps)
    if hlo and out_dir:  # the optimised program: how XLA lowered each matmul
        with open(os.path.join(out_dir, f"decode_B{batch}.hlo.txt"), "w") as f:
            f.write(run.lower().compile().as_text())
    run(2)  # compiles
    times = []
    for _ in range(3):
        t = time.perf_counter()
        run()
        times.append((time.perf_counter() - t) / steps)
    log_dir = tempfile.mkdtemp(prefix="phi3_trace_")
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        run()
    assert run.drawn == 2 + 4 * steps, f"decode drew {run.drawn} tokens"
    events = trace_events(log_dir)
    kernels = device_kernels(events)
    busy = sum(k["dur_us"] for k in kernels) / steps
    threads = collections.Counter(f"{e['proc']} | {e['thread']}" for e in events)
    if out_dir:
        for f in glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True):
            os.replace(f, os.path.join(out_dir, f"decode_B{batch}_ctx{ctx}.trace.json.gz"))
    ms = float(np.median(times)) * 1e3
    filled = P + 2 + steps * 2
    need, _ = decode_bytes(c, batch, filled, ctx)
    return dict(batch=batch, ctx=ctx, ms=ms, kernel_busy_ms=busy / 1e3,
                kernels_per_step=len(kernels) / steps, frac_bw=need / (ms / 1e3) / (BW_TBS * 1e12),
                floor_ms=need / (BW_TBS * 1e12) * 1e3, top=summarise(kernels, steps, top=14),
                threads=dict(threads.most_common(12)))


def prefill_profile(raw: dict, model: Phi3, batch: int, T: int, out_dir: str | None
                    ) -> dict:
    """B prompts of T tokens (a cache of T slots), each prefilled alone as the engine does,
    profiled: where its time goes."""
    rs = np.random.RandomState(0)
    prompts = rs.randint(3, raw["vocab_size"] - 1, (batch, T)).astype(np.int32)

    def prefill():
        cache, seen = calls.new_state(model, batch, T)
        return jax.block_until_ready(calls.prefill_rows(model, cache, seen, prompts))

    prefill()
    t = time.perf_counter()
    prefill()
    ms = (time.perf_counter() - t) * 1e3
    log_dir = tempfile.mkdtemp(prefix="phi3_trace_")
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        prefill()
    kernels = device_kernels(trace_events(log_dir))
    if out_dir:
        for f in glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True):
            os.replace(f, os.path.join(out_dir, f"prefill_B{batch}_T{T}.trace.json.gz"))
    return dict(batch=batch, T=T, ms=ms, kernel_busy_ms=sum(k["dur_us"] for k in kernels) / 1e3,
                top=summarise(kernels, 1, top=15))


def gemv_bandwidth(raw: dict, batch: int, layers: int) -> list[dict]:
    """Achieved TB/s of x [B, in] @ W for each weight shape of a layer, both storage orders."""
    D, F = raw["hidden_size"], raw["intermediate_size"]
    N, K = raw["num_attention_heads"], raw["num_key_value_heads"]
    H = D // N
    shapes = {"qkv": (D, (N + 2 * K) * H), "o_proj": (N * H, D), "gate_up": (D, 2 * F),
              "down": (F, D), "head": (D, raw["vocab_size"])}
    rows = []
    key = jax.random.key(0)
    for name, (n_in, n_out) in shapes.items():
        n = 1 if name == "head" else layers
        x = jax.random.normal(key, (batch, n_in), jnp.bfloat16)
        # "rows2": x with a zero row appended (in_out order), as attention does for o_proj at
        # one token: XLA then emits a matmul instead of a multiply + reduction.
        for order in ("in_out", "out_in") + (("rows2",) if batch == 1 else ()):
            shape = (n_out, n_in) if order == "out_in" else (n_in, n_out)
            ws = [jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16)
                  for i in range(n)]
            spec = "bi,oi->bo" if order == "out_in" else "bi,io->bo"
            if order == "rows2":
                f = jax.jit(lambda x, ws: [jnp.einsum("bi,io->bo", jnp.concatenate(
                    [x, jnp.zeros_like(x)]), w)[:1] for w in ws])
            else:
                f = jax.jit(lambda x, ws, spec=spec: [jnp.einsum(spec, x, w) for w in ws])
            jax.block_until_ready(f(x, ws))
            ts = []
            for _ in range(10):
                t = time.perf_counter()
                jax.block_until_ready(f(x, ws))
                ts.append(time.perf_counter() - t)
            s = float(np.median(ts))
            nbytes = n * n_in * n_out * 2
            rows.append(dict(weight=name, order=order, batch=batch, us_per_matrix=s / n * 1e6,
                             tb_s=nbytes / s / 1e12, frac_bw=nbytes / s / 1e12 / BW_TBS))
            del ws
    return rows


def print_top(top: list[dict]) -> None:
    print(f"  {'us/step':>9} {'calls':>6} {'share':>6}  kernel")
    for k in top:
        print(f"  {k['us_per_step']:9.1f} {k['calls_per_step']:6.1f} "
              f"{100 * k['share']:5.1f}%  {k['kernel']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-gemv", action="store_true")
    p.add_argument("--hlo", action="store_true", help="write the compiled decode HLO to --out")
    p.add_argument("--prefill", type=int, nargs=2, metavar=("B", "T"), default=None,
                   help="also profile one prefill of B x T tokens")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    raw = TINY if args.tiny else MINI
    ctx = 128 if args.tiny else args.ctx
    config = Phi3Config(**dict(raw, eos_token_id=(raw["eos_token_id"],)))
    graphdef, params = random_model(config)
    model = Phi3(config, graphdef, params, generation_config={})
    result = {"bench": "profile_decode", "device": jax.devices()[0].device_kind,
              "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "decode": [], "gemv": [], "prefill": None}
    for b in args.batch:
        r = decode_profile(raw, model, b, ctx, args.steps, args.out, args.hlo)
        result["decode"].append(r)
        print(f"\ndecode B={b} ctx={ctx}: {r['ms']:.3f} ms/step (floor {r['floor_ms']:.3f}, "
              f"{100 * r['frac_bw']:.1f}% of BW), kernels busy {r['kernel_busy_ms']:.3f} ms, "
              f"{r['kernels_per_step']:.0f} kernels/step")
        print_top(r["top"])
        if not r["top"]:
            print("  no device kernels in the trace; its threads:", r["threads"])
    if args.prefill:
        r = prefill_profile(raw, model, *args.prefill, args.out)
        result["prefill"] = r
        print(f"\nprefill {r['batch']}x{r['T']}: {r['ms']:.2f} ms, kernels busy "
              f"{r['kernel_busy_ms']:.2f} ms")
        print_top(r["top"])
    if not args.no_gemv:
        del params, model
        for b in sorted({1, max(args.batch)}):
            result["gemv"] += gemv_bandwidth(raw, b, 2 if args.tiny else 32)
        print(f"\n{'weight':8} {'order':7} {'B':>3} {'us/matrix':>10} {'TB/s':>6} {'% BW':>6}")
        for r in result["gemv"]:
            print(f"{r['weight']:8} {r['order']:7} {r['batch']:>3} {r['us_per_matrix']:10.1f} "
                  f"{r['tb_s']:6.2f} {100 * r['frac_bw']:6.1f}")
    print_result(result, args.out, "profile_decode.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
