"""GPU inference speed: phi3-jax vs transformers (eager SDPA and static-cache compiled), one run.

Random bf16 weights at Phi-3-mini's shapes are built directly on the device (no checkpoint I/O).
Each engine runs in its own child process (so its peak memory is its own and JAX's allocator
pool does not starve torch), one after the other, on the same GPU.

phi3-jax runs the engine's own compiled programs (phi3_jax.engine.programs, called directly by
benchmarks/engine_calls.py): each prompt prefilled into its cache row, then greedy decode calls
over every row with eos and all other stops off. After 2 warm-up steps (compilation), CHUNKS
calls of STEPS steps are timed (each waits for its tokens on the host); ms/step is the median
call over STEPS. Two cache layouts:
  - "tight": prompt of ctx-64 tokens in a cache of exactly ctx slots, attention reading all of
    them, no logprobs;
  - "generate": what `model.generate` builds for that batch (an Engine with a bucketed cache
    length, its first-chunk bucket and read length, and its logprob alternatives), i.e. what
    users get.
Prefill: B prompts of T tokens, each prefilled alone as the engine does (first token chosen),
tok/s. TTFT: one 2048-token prompt through the engine (submit to first token, host included).

transformers: `Phi3ForCausalLM` bf16 on CUDA, SDPA attention, `generate(min_new_tokens=n)`;
decode ms/step = (t(n) - t(1)) / (n - 1), best of 3. "compiled" = `cache_implementation=
"static"` (generate then compiles the decode forward with torch.compile, CUDA graphs).
Prefill: a forward of B x T with logits_to_keep=1.

Hardware fractions: decode against BW_TBS (measured device-to-device copy, read + write) with
bytes = weights read (all matrices incl. the head; the embedding is a lookup) + the filled
KV (prompt + generated, K and V, all layers); "impl" bytes count the whole cache the
implementation reads (S slots). Prefill against PEAK_TFLOPS: 2 * matmul params * tokens +
causal attention (2 * T^2 * D per layer per row, QK and PV, halved for causality).

    python benchmarks/bench_gpu.py [--out DIR] [--budget 500]     # H100, Phi-3-mini
    python benchmarks/bench_gpu.py --config medium                # Phi-3-medium (14B)
    python benchmarks/bench_gpu.py --cases long                   # one 100k-token prompt
    python benchmarks/bench_gpu.py --tiny [--cases long]          # CPU smoke run, seconds

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from benchmarks.machine import print_result  # noqa: E402

BW_TBS = 2.97  # issue 6: device-to-device copy on the H100, read + write
PEAK_TFLOPS = 806.0  # issue 6: bf16 8192^3 matmul on the H100
NEW = 64  # generated tokens budgeted per row (the prompt is ctx - NEW)
STEPS, CHUNKS = 16, 3

MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
            sliding_window=2047, bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
# Phi-3-medium-4k (14B): decode batch 1 is the issue's "85% of bandwidth" case.
MEDIUM = dict(MINI, hidden_size=5120, intermediate_size=17920, num_hidden_layers=40,
              num_attention_heads=40, num_key_value_heads=10)
# Phi-3-mini-128k: LongRoPE (factor values do not change the speed), window past any prompt.
MINI_128K = dict(MINI, max_position_embeddings=131072, sliding_window=262144,
                 original_max_position_embeddings=4096,
                 rope_scaling={"type": "longrope", "short_factor": [1.0] * 48,
                               "long_factor": [4.0] * 48})
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)

# (kind, batch, context): in priority order; a child stops starting cases near its deadline.
FULL_JAX = [("decode_tight", 1, 1024), ("decode_tight", 16, 1024), ("decode_tight", 64, 1024),
            ("prefill", 8, 2048), ("ttft", 1, 2048), ("decode_generate", 1, 1024),
            ("decode_generate", 16, 1024), ("decode_tight", 1, 4096),
            ("decode_tight", 16, 4096)]
FULL_HF = [("eager_decode", 1, 1024), ("eager_decode", 16, 1024), ("eager_decode", 64, 1024),
           ("prefill", 8, 2048), ("ttft", 1, 2048), ("compiled_decode", 1, 1024),
           ("compiled_decode", 64, 1024), ("compiled_decode", 16, 1024),
           ("eager_decode", 1, 4096), ("eager_decode", 16, 4096)]
TINY_JAX = [("decode_tight", 1, 128), ("decode_tight", 4, 128), ("prefill", 2, 32),
            ("ttft", 1, 32), ("decode_generate", 1, 128)]
TINY_HF = [("eager_decode", 1, 128), ("prefill", 2, 32)]
# --cases prefill: phi3-jax prefill and TTFT only (no transformers child), e.g. to time the fused
# attention path; 16x4096 OOMs on the unfused path (fp32 scores), and 64x960 and 16x4096 ran out
# of memory with cuDNN before the per-layer barrier (stop 9).
PREFILL_JAX = [("prefill", 8, 2048), ("ttft", 1, 2048), ("prefill", 16, 4096),
               ("prefill", 64, 960), ("ttft_no_barrier", 1, 2048), ("ttft", 1, 512),
               ("ttft_no_barrier", 1, 512)]
TINY_PREFILL_JAX = [("prefill", 2, 32), ("ttft", 1, 32), ("ttft_no_barrier", 1, 32)]
# --config medium: Phi-3-medium decode (and its transformers compiled peer), prefill.
MEDIUM_JAX = [("decode_tight", 1, 1024), ("decode_tight", 16, 1024), ("prefill", 4, 2048),
              ("ttft", 1, 2048)]
MEDIUM_HF = [("compiled_decode", 1, 1024), ("eager_decode", 1, 1024), ("prefill", 4, 2048)]
# --cases long: one prompt of ctx tokens through generate()'s own path (bucketed prefill with
# the long LongRoPE factors, then decode at that context), Phi-3-mini-128k shapes.
LONG_JAX = [("long", 1, 100_000)]
TINY_LONG = dict(TINY, max_position_embeddings=1024, original_max_position_embeddings=64,
                 rope_scaling={"type": "longrope", "short_factor": [1.0] * 8,
                               "long_factor": [4.0] * 8})
TINY_LONG_JAX = [("long", 1, 300)]


def counts(raw: dict) -> dict:
    """Parameter counts and per-token KV bytes (bf16) of a config dict."""
    D, F, V, L = (raw["hidden_size"], raw["intermediate_size"], raw["vocab_size"],
                  raw["num_hidden_layers"])
    N, K = raw["num_attention_heads"], raw["num_key_value_heads"]
    H = D // N
    per_layer = D * (N + 2 * K) * H + N * H * D + 3 * D * F
    matmul = L * per_layer + V * D  # the head; the embedding is a lookup
    return dict(matmul=matmul, total=matmul + V * D + (2 * L + 1) * D,
                weight_bytes=2 * (matmul + (2 * L + 1) * D), kv_bytes_per_token=2 * 2 * L * K * H,
                D=D, L=L)


def decode_bytes(c: dict, batch: int, filled: float, slots: int) -> tuple[float, float]:
    """(minimum bytes per decode step, bytes the implementation reads)."""
    return (c["weight_bytes"] + batch * filled * c["kv_bytes_per_token"],
            c["weight_bytes"] + batch * slots * c["kv_bytes_per_token"])


def prefill_flops(c: dict, batch: int, T: int) -> float:
    return batch * (2 * c["matmul"] * T + 2 * c["L"] * T * T * c["D"])


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def random_model(config):
    """(graphdef, params): random bf16 weights made on the device by one jitted init, so nothing
    crosses from the host. The RBG generator: threefry's init took 64 s (Phi-3-mini) and 101 s
    (Phi-3-medium) on the H100, most of it compiling; the values do not matter for speed."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from phi3_jax.model import Phi3ForCausalLM, abstract_model

    graphdef, _ = abstract_model(config, jnp.bfloat16)
    params = jax.jit(lambda: nnx.split(
        Phi3ForCausalLM(config, dtype=jnp.bfloat16,
                        rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg"))))[1])()
    return graphdef, jax.block_until_ready(params)


def emit(row: dict) -> None:
    print("CASE " + json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------------
# phi3-jax


def run_jax(raw: dict, cases: list, deadline: float) -> None:
    import jax

    from benchmarks import engine_calls as calls
    from phi3_jax.api import Phi3
    from phi3_jax.compilation import bucket_length
    from phi3_jax.config import Phi3Config
    from phi3_jax.engine import Engine, programs

    config = Phi3Config.from_hf(dict(raw, model_type="phi3"))
    c = counts(raw)
    device = jax.devices()[0]
    t0 = time.perf_counter()
    graphdef, params = random_model(config)
    model = Phi3(config, graphdef, params, generation_config={})
    emit({"engine": "phi3-jax", "case": "init", "s": time.perf_counter() - t0,
          "device": device.device_kind, "jax": jax.__version__,
          "prefill_attention": model.kernels.prefill, "decode_attention": model.kernels.decode})
    rs = np.random.RandomState(0)

    def peak_gib() -> float | None:
        stats = device.memory_stats() or {}
        return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None

    def prompts(batch: int, length: int) -> np.ndarray:
        return rs.randint(3, raw["vocab_size"] - 1, (batch, length)).astype(np.int32)

    def time_decode(run: calls.DecodeRun) -> tuple[float, float, int]:
        """2 steps first (compiling the program), then CHUNKS calls of STEPS steps."""
        t = time.perf_counter()
        run(2)
        compile_s = time.perf_counter() - t
        chunks = []
        for _ in range(CHUNKS):
            t = time.perf_counter()
            run(STEPS)
            chunks.append((time.perf_counter() - t) / STEPS)
        assert run.drawn == 2 + CHUNKS * STEPS, f"decode drew {run.drawn} tokens"
        return float(np.median(chunks)), compile_s, run.drawn

    def prefill_batch(batch: int, T: int):
        """B prompts of T tokens, each prefilled alone as the engine does."""
        cache, seen = calls.new_state(model, batch, T)
        return calls.prefill_rows(model, cache, seen, prompts(batch, T))

    def prefill_long(engine: Engine, prompt: np.ndarray) -> np.ndarray:
        """The engine's chunked prefill of one prompt into row 0, with the long factors."""
        cache, seen = engine.cache, engine.seen
        for ch in engine.shapes.chunks(len(prompt)):
            args, kw = calls.prefill_args(
                model, cache, seen, 0, prompt[ch.start:ch.start + ch.count], ch.T,
                start=ch.start, read_len=ch.read_len, use_long=True)
            cache, seen, drawn, _ = programs.prefill(*args, **kw)
        engine.cache, engine.seen = cache, seen
        return np.asarray(drawn.tokens)

    def engine_ttft(engine: Engine, prompt: np.ndarray) -> float:
        """Seconds from submit to the first token, through the engine's whole host path."""
        t = time.perf_counter()
        request = engine.submit(prompt.tolist(), max_new_tokens=1, ignore_eos=True)
        engine.run_until_done()
        assert len(request.completion().token_ids) == 1
        return time.perf_counter() - t

    for kind, batch, ctx in cases:
        if time.perf_counter() > deadline:
            emit({"engine": "phi3-jax", "case": kind, "batch": batch, "ctx": ctx,
                  "skipped": "time budget"})
            continue
        row = {"engine": "phi3-jax", "case": kind, "batch": batch, "ctx": ctx}
        try:
            if kind == "decode_tight":
                P = ctx - NEW
                cache, seen = calls.new_state(model, batch, ctx)
                t = time.perf_counter()
                cache, seen, first = calls.prefill_rows(model, cache, seen, prompts(batch, P))
                row["prefill_first_s"] = time.perf_counter() - t
                run = calls.DecodeRun(model, cache, seen, first, P, read_len=ctx,
                                      max_steps=STEPS)
                ms, row["decode_compile_s"], steps = time_decode(run)
                slots = ctx
                filled = P + 2 + CHUNKS * STEPS / 2
            elif kind == "decode_generate":
                # What model.generate builds for these prompts: an engine with a bucketed
                # cache length, its first-chunk bucket, its read length and logprob width.
                P = ctx - NEW
                engine = Engine(model, max_slots=batch, max_len=bucket_length(P + NEW),
                                decode_steps=STEPS, max_logprobs=0)  # none asked for
                (chunk,) = engine.shapes.chunks(P)
                t = time.perf_counter()
                cache, seen, first = calls.prefill_rows(model, engine.cache, engine.seen,
                                                        prompts(batch, P), T=chunk.T)
                row["prefill_first_s"] = time.perf_counter() - t
                slots = engine.shapes.read_len(P + 2 + CHUNKS * STEPS)
                run = calls.DecodeRun(model, cache, seen, first, P, read_len=slots,
                                      max_steps=STEPS, top_n=engine.shapes.top_n)
                row.update(prompt_bucket=chunk.T, cache_slots=engine.shapes.max_len)
                del engine
                ms, row["decode_compile_s"], steps = time_decode(run)
                filled = P + 2 + CHUNKS * STEPS / 2
            elif kind == "prefill":
                t = time.perf_counter()
                jax.block_until_ready(prefill_batch(batch, ctx))
                row["compile_s"] = time.perf_counter() - t
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    jax.block_until_ready(prefill_batch(batch, ctx))
                    times.append(time.perf_counter() - t)
                s = float(np.median(times))
                flops = prefill_flops(c, batch, ctx)
                row.update(ms=1e3 * s, tok_s=batch * ctx / s, tflops=flops / s / 1e12,
                           frac_peak=flops / s / 1e12 / PEAK_TFLOPS, peak_gib=peak_gib())
                emit(row)
                continue
            elif kind == "long":
                # The engine's chunked prefill with the long factors, twice (the first
                # compiles), then decode at that context.
                total = ctx + 2 + CHUNKS * STEPS
                engine = Engine(model, max_slots=1, max_len=bucket_length(total + 1),
                                decode_steps=STEPS, max_logprobs=0)
                chunks = engine.shapes.chunks(ctx)
                prompt = prompts(1, ctx)[0]
                t = time.perf_counter()
                prefill_long(engine, prompt)
                row["compile_s"] = time.perf_counter() - t
                t = time.perf_counter()
                first = prefill_long(engine, prompt)
                last = chunks[-1]
                row.update(prefill_ms=1e3 * (time.perf_counter() - t),
                           prompt_bucket=last.start + last.T,
                           cache_slots=engine.shapes.max_len, peak_gib=peak_gib())
                slots = engine.shapes.read_len(total)
                run = calls.DecodeRun(model, engine.cache, engine.seen, first, ctx,
                                      read_len=slots, max_steps=STEPS, use_long=True)
                del engine
                ms, row["decode_compile_s"], steps = time_decode(run)
                filled = ctx + 2 + CHUNKS * STEPS / 2
            elif kind in ("ttft", "ttft_no_barrier"):
                # Submit to first token through the engine. ttft_no_barrier: the same prefill
                # without model.hidden_states' per-layer barrier (which bounds a long
                # prefill's memory), to price it at this size.
                barrier = jax.lax.optimization_barrier
                if kind == "ttft_no_barrier":
                    jax.lax.optimization_barrier = lambda x: x
                    programs.prefill.clear_cache()  # the barrier is read at trace time
                try:
                    engine = Engine(model, max_slots=1, max_len=bucket_length(ctx + NEW))
                    prompt = prompts(1, ctx)[0]
                    row["compile_s"] = engine_ttft(engine, prompt)
                    times = [engine_ttft(engine, prompt) for _ in range(3)]
                finally:
                    if kind == "ttft_no_barrier":
                        jax.lax.optimization_barrier = barrier
                        programs.prefill.clear_cache()
                row.update(ms=1e3 * float(np.median(times)),
                           cache_slots=engine.shapes.max_len, peak_gib=peak_gib())
                del engine
                emit(row)
                continue
            else:
                raise ValueError(kind)
            need, read = decode_bytes(c, batch, filled, slots)
            s = ms
            row.update(ms=1e3 * s, tok_s=batch / s, cache_slots=slots, filled=filled,
                       min_bytes=need, impl_bytes=read,
                       frac_bw=need / s / (BW_TBS * 1e12),
                       frac_bw_impl=read / s / (BW_TBS * 1e12), steps=steps, peak_gib=peak_gib())
            del run
        except Exception as e:  # an OOM in one case should not hide the others' numbers
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        emit(row)


# ---------------------------------------------------------------------------------------------
# transformers


def run_hf(raw: dict, cases: list, deadline: float, tiny: bool) -> None:
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    config = transformers.Phi3Config(**raw, rope_theta=10000.0)
    t0 = time.perf_counter()
    with torch.device(dev):
        model = transformers.Phi3ForCausalLM._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    if cuda:
        torch.cuda.synchronize()
    emit({"engine": "transformers", "case": "init", "s": time.perf_counter() - t0,
          "device": torch.cuda.get_device_name() if cuda else "cpu",
          "torch": torch.__version__, "transformers": transformers.__version__})
    rs = np.random.RandomState(0)
    c = counts(raw)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def peak_gib():
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    def gen_time(ids, n, **kw) -> float:
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, **kw)
        sync()
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t

    for kind, batch, ctx in cases:
        name = "transformers-compiled" if kind.startswith("compiled") else "transformers"
        if kind.startswith("compiled") and not cuda:
            continue
        if time.perf_counter() > deadline:
            emit({"engine": name, "case": kind, "batch": batch, "ctx": ctx,
                  "skipped": "time budget"})
            continue
        row = {"engine": name, "case": kind, "batch": batch, "ctx": ctx}
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            if kind in ("eager_decode", "compiled_decode"):
                P = ctx - NEW
                ids = torch.tensor(rs.randint(3, raw["vocab_size"] - 1, (batch, P)), device=dev)
                kw = {"cache_implementation": "static"} if kind == "compiled_decode" else {}
                n = STEPS + 1 if tiny else 33
                t = time.perf_counter()
                gen_time(ids, n, **kw)  # warm-up (compiles the compiled variant)
                row["first_call_s"] = time.perf_counter() - t
                full = min(gen_time(ids, n, **kw) for _ in range(3))
                one = min(gen_time(ids, 1, **kw) for _ in range(3))
                s = (full - one) / (n - 1)
                filled = P + n / 2
                need, _ = decode_bytes(c, batch, filled, P + n)
                row.update(ms=1e3 * s, tok_s=batch / s, filled=filled,
                           frac_bw=need / s / (BW_TBS * 1e12), peak_gib=peak_gib())
            elif kind in ("prefill", "ttft"):
                ids = torch.tensor(rs.randint(3, raw["vocab_size"] - 1, (batch, ctx)),
                                   device=dev)

                def forward(ids=ids):
                    sync()
                    t = time.perf_counter()
                    with torch.inference_mode():
                        logits = model(ids, use_cache=False, logits_to_keep=1).logits
                        logits.argmax(-1)
                    sync()
                    return time.perf_counter() - t

                forward()
                s = min(forward() for _ in range(3))
                flops = prefill_flops(c, batch, ctx)
                row.update(ms=1e3 * s, tok_s=batch * ctx / s, tflops=flops / s / 1e12,
                           frac_peak=flops / s / 1e12 / PEAK_TFLOPS, peak_gib=peak_gib())
            else:
                raise ValueError(kind)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        emit(row)


# ---------------------------------------------------------------------------------------------
# parent: runs the children, prints the table and the JSON line


def child(engine: str, args: argparse.Namespace, budget: float, log) -> list[dict]:
    """Runs one engine in a subprocess; returns its CASE rows (partial ones if it was killed)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--engine", engine, "--budget",
           str(budget), "--cases", args.cases, "--config", args.config] + (
               ["--tiny"] if args.tiny else [])
    rows = []
    # JAX may take most of the card: torch runs later, in its own process.
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.92")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    kill_at = time.perf_counter() + budget + 60  # the last case may overrun its start check
    for line in proc.stdout:
        if log:
            log.write(line)
            log.flush()
        if line.startswith("CASE "):
            rows.append(json.loads(line[5:]))
            print(line.rstrip(), flush=True)
        if time.perf_counter() > kill_at:
            proc.kill()
            rows.append({"engine": engine, "case": "killed", "error": "over budget"})
            break
    proc.wait()
    if proc.returncode not in (0, None) and not any(r.get("case") == "killed" for r in rows):
        rows.append({"engine": engine, "case": "exit", "error": f"exit {proc.returncode}"})
    return rows


def fmt(v, spec):
    return format(v, spec) if isinstance(v, int | float) else "-"


def table(rows: list[dict]) -> None:
    print(f"{'engine':22} {'case':16} {'B':>3} {'ctx':>5} {'ms':>9} {'tok/s':>10} "
          f"{'limit %':>8} {'impl %':>7} {'compile s':>9} {'peak GiB':>8}")
    for r in rows:
        if r.get("case") in ("init", None):
            continue
        if "error" in r or "skipped" in r:
            print(f"{r['engine']:22} {r['case']:16} {r.get('batch', ''):>3} {r.get('ctx', ''):>5}"
                  f"  {r.get('error') or 'skipped: ' + r['skipped']}")
            continue
        frac = r.get("frac_bw", r.get("frac_peak"))
        comp = r.get("decode_compile_s", r.get("compile_s", r.get("first_call_s")))
        print(f"{r['engine']:22} {r['case']:16} {r['batch']:>3} {r['ctx']:>5} "
              f"{fmt(r.get('ms'), '9.2f')} {fmt(r.get('tok_s'), '10,.0f')} "
              f"{fmt(100 * frac if frac is not None else None, '8.1f')} "
              f"{fmt(100 * r['frac_bw_impl'] if 'frac_bw_impl' in r else None, '7.1f')} "
              f"{fmt(comp, '9.1f')} {fmt(r.get('peak_gib'), '8.1f')}")
        if "prefill_ms" in r:
            print(f"{'':22} {'  its prefill':16} {r['batch']:>3} {r['prompt_bucket']:>5} "
                  f"{r['prefill_ms']:9.1f}  (prompt of {r['ctx']} tokens, bucket "
                  f"{r['prompt_bucket']}, cache {r['cache_slots']} slots)")


def ratios(rows: list[dict]) -> dict:
    """phi3-jax decode tok/s over each transformers variant's, matched on (batch, ctx)."""
    jax_rows = {(r["batch"], r["ctx"]): r for r in rows
                if r.get("engine") == "phi3-jax" and r.get("case") == "decode_tight"
                and "tok_s" in r}
    gen_rows = {(r["batch"], r["ctx"]): r for r in rows
                if r.get("engine") == "phi3-jax" and r.get("case") == "decode_generate"
                and "tok_s" in r}
    out = {}
    for r in rows:
        if r.get("case") in ("eager_decode", "compiled_decode") and "tok_s" in r:
            key = (r["batch"], r["ctx"])
            for label, src in (("tight", jax_rows), ("generate", gen_rows)):
                if key in src:
                    out[f"{label}/{r['case']} B={key[0]} ctx={key[1]}"] = (
                        src[key]["tok_s"] / r["tok_s"])
        if r.get("case") in ("prefill", "ttft") and r.get("engine") == "transformers" \
                and "ms" in r:
            mine = [j for j in rows if j.get("engine") == "phi3-jax"
                    and j.get("case") == r["case"] and j.get("batch") == r["batch"] and "ms" in j]
            if mine:
                out[f"{r['case']} B={r['batch']} T={r['ctx']} (hf ms / jax ms)"] = (
                    r["ms"] / mine[0]["ms"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="small config on the CPU, seconds")
    p.add_argument("--engine", choices=["all", "jax", "hf"], default="all")
    p.add_argument("--budget", type=float, default=500.0,
                   help="seconds for the whole run (split between the engines); cases not "
                        "started by then are reported as skipped")
    p.add_argument("--out", default=None, help="folder for the child logs and the JSON")
    p.add_argument("--cases", choices=["all", "prefill", "long"], default="all",
                   help="prefill: phi3-jax prefill and TTFT cases only (no transformers run); "
                        "long: one 100k-token prompt, prefill and decode, Phi-3-mini-128k "
                        "shapes (phi3-jax only)")
    p.add_argument("--config", choices=["mini", "medium"], default="mini",
                   help="medium: Phi-3-medium-4k shapes (14B), a shorter case list")
    args = p.parse_args()
    start = time.perf_counter()
    if args.cases == "long":
        raw = TINY_LONG if args.tiny else MINI_128K
        jax_cases, hf_cases = (TINY_LONG_JAX if args.tiny else LONG_JAX), []
    elif args.cases == "prefill":
        raw = TINY if args.tiny else MINI
        jax_cases, hf_cases = (TINY_PREFILL_JAX if args.tiny else PREFILL_JAX), []
    elif args.config == "medium" and not args.tiny:
        raw, jax_cases, hf_cases = MEDIUM, MEDIUM_JAX, MEDIUM_HF
    else:
        raw = TINY if args.tiny else MINI
        jax_cases, hf_cases = (TINY_JAX, TINY_HF) if args.tiny else (FULL_JAX, FULL_HF)
    if args.engine == "jax":
        run_jax(raw, jax_cases, start + args.budget)
        return 0
    if args.engine == "hf":
        run_hf(raw, hf_cases, start + args.budget, args.tiny)
        return 0
    if args.tiny:  # one process: imports dominate a CPU smoke run
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        import contextlib
        import io

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            run_jax(raw, jax_cases, start + args.budget)
            if hf_cases:
                run_hf(raw, hf_cases, start + args.budget, True)
        rows = [json.loads(line[5:]) for line in buf.getvalue().splitlines()
                if line.startswith("CASE ")]
    else:
        out = args.out or os.path.join(ROOT, "benchmarks", ".bench_gpu_out")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "bench_gpu.log"), "w") as log:
            share = 0.5 if hf_cases else 1.0
            rows = child("jax", args, share * args.budget, log)
            if hf_cases:
                rows += child("hf", args, args.budget - (time.perf_counter() - start), log)
    table(rows)
    result = {"bench": "gpu_inference", "tiny": args.tiny, "config": args.config,
              "cases": args.cases, "commit": git_head(),
              "bw_tbs": BW_TBS, "peak_tflops": PEAK_TFLOPS, "new": NEW, "steps": STEPS,
              "chunks": CHUNKS, "counts": counts(raw), "ratios": ratios(rows), "rows": rows,
              "wall_s": time.perf_counter() - start}
    print_result(result, args.out, "bench_gpu.json")
    errors = [r for r in rows if "error" in r]
    return 1 if args.tiny and errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
