"""Full forward pass (prefill logits) of a small Phi-3 config: phi3_jax vs transformers on the CPU.

Both implementations load the same random checkpoint (written by transformers'
save_pretrained), run the same [batch, seq] prompt in fp32 and are timed in the same process:
warm-up runs first (they include XLA compilation), then the median of --runs timed calls,
interleaved round-robin across implementations.
phi3_jax is timed through the public `model.logits(ids)` (host-side input checks and
bucketing included) with block_until_ready; transformers under torch.inference_mode with its
eager and SDPA attention. A max |diff| between the two logits checks that the same computation
is being timed.

Prints a table (impl, ms, tokens/s, ratio = ms / phi3_jax ms: above 1 means phi3_jax is
faster), then one JSON line.

    python benchmarks/bench_forward.py                    # D=256, 4 layers, V=4096
    python benchmarks/bench_forward.py --config medium    # Phi-4-mini-like, D=512, 8 layers
    python benchmarks/bench_forward.py --threads 1        # one CPU thread each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from machine import cpu_model

# The working tree's phi3_jax, not an installed copy (which may be stale).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CONFIGS = {
    # Phi-3-mini's shape family (MHA, full rotary), scaled down.
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096),
    # Phi-4-mini's (GQA, partial rotary 0.75, tied head, LongRoPE), scaled down.
    "medium": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376,
                   num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                   max_position_embeddings=16384, original_max_position_embeddings=4096,
                   partial_rotary_factor=0.75, tie_word_embeddings=True,
                   rope_scaling={"type": "longrope",
                                 "short_factor": [1.0] * 24,
                                 "long_factor": [1.0 + 0.5 * i for i in range(24)]}),
}


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_ms(fns: dict, warmup: int, runs: int) -> dict[str, float]:
    """Median milliseconds per call of each fn. Runs are interleaved round-robin, so that load
    from other processes on a shared machine falls on every implementation alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, choices=(1,), default=None,
                        help="pin both implementations to one CPU thread (steadier figures on a "
                             "shared machine); default: each uses all cores")
    args = parser.parse_args()

    # Set before jax is imported: XLA reads its flags once.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.threads == 1:
        single = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {single}".strip()
    import flax
    import jax
    import torch
    import transformers

    import phi3_jax

    if args.threads == 1:
        torch.set_num_threads(1)
    config = {**CONFIGS[args.config], "rms_norm_eps": 1e-5, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 0}
    ids = np.random.RandomState(args.seed).randint(0, config["vocab_size"],
                                                   (args.batch, args.seq))
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(args.seed)
        transformers.Phi3ForCausalLM(transformers.Phi3Config(**config)).save_pretrained(tmp)
        ours = phi3_jax.load(tmp, dtype="float32")
        refs = {attn: transformers.Phi3ForCausalLM.from_pretrained(
                    tmp, dtype=torch.float32, attn_implementation=attn).eval()
                for attn in ("eager", "sdpa")}
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ours.params))

    def run_ours():
        return ours.logits(ids).block_until_ready()

    torch_ids = torch.from_numpy(ids.astype(np.int64))

    def run_ref(model):
        def call():
            with torch.inference_mode():
                return model(torch_ids).logits
        return call

    fns = {"phi3_jax": run_ours, **{f"transformers-{a}": run_ref(m) for a, m in refs.items()}}
    ms = median_ms(fns, args.warmup, args.runs)
    diff = float(np.max(np.abs(np.asarray(run_ours()) - run_ref(refs["eager"])().numpy())))

    print(f"forward pass, config {args.config} ({n_params / 1e6:.1f}M params: "
          f"D={config['hidden_size']}, L={config['num_hidden_layers']}, "
          f"V={config['vocab_size']}), batch {args.batch} x {args.seq} tokens, float32, "
          f"{cpu_model()} ({os.cpu_count()} cores, threads: {args.threads or 'all'}, "
          f"load average {os.getloadavg()[0]:.1f})")
    print(f"max |logits diff| phi3_jax vs transformers-eager: {diff:.2e}")
    print(f"{'impl':<22}{'ms':>10}{'tokens/s':>12}{'ratio':>8}")
    for impl, t in ms.items():
        print(f"{impl:<22}{t:>10.2f}{tokens / t * 1e3:>12.0f}{t / ms['phi3_jax']:>8.2f}")
    print(json.dumps({
        "bench": "forward", "config": args.config, "params": n_params, "batch": args.batch,
        "seq": args.seq, "dtype": "float32", "runs": args.runs, "warmup": args.warmup,
        "ms": {k: round(v, 3) for k, v in ms.items()},
        "tokens_per_s": {k: round(tokens / v * 1e3, 1) for k, v in ms.items()},
        "max_abs_diff": diff, "device": cpu_model(), "cores": os.cpu_count(),
        "threads": args.threads or "all",
        "loadavg_1m": round(os.getloadavg()[0], 2), "jax": jax.__version__,
        "flax": flax.__version__, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": git_head(),
    }))


if __name__ == "__main__":
    main()
