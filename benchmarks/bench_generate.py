"""Generation speed: phi3-jax vs transformers' `generate`, same random weights, same machine.

Prefill: a generation of one token (the prompt's forward pass, choosing the first token, and
each engine's per-call host work), in prompt tokens per second.
Decode: each further token is one forward pass of a single position per row against the
KV cache; it is bound by reading the weights (and cache) once per step, so batching rows
multiplies tokens/s almost for free until compute takes over. Both are greedy, fp32, and run
the full max_new_tokens (eos cannot stop a row early: transformers gets min_new_tokens, the
JAX run clears its stop ids). Decode time = full generation - prefill. JAX times exclude
compilation (reported separately as the first call); each figure is the best of --repeats runs
after a warm-up, the two engines interleaved (the box may be shared: the minimum is the least
disturbed run).

    python benchmarks/bench_generate.py [--batch 1 4] [--prompt 128] [--new 64] [--single-thread]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

# The working tree's phi3_jax, not an installed copy (which may be stale).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SMALL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


def jax_runner(path: str, prompts: np.ndarray, new: int) -> dict:
    """Compiles, then returns {"prefill": fn, "full": fn} timing callables and the compile time.
    Both run the public `model.generate` (the engine), eos ignored as transformers with
    min_new_tokens."""
    import phi3_jax

    model = phi3_jax.load(path)
    rows = prompts.tolist()

    def prefill():
        model.generate(rows, max_new_tokens=1, temperature=0.0, ignore_eos=True)

    def full():
        out = model.generate(rows, max_new_tokens=new, temperature=0.0, ignore_eos=True)
        assert all(len(c.token_ids) == new for c in out)

    start = time.perf_counter()
    prefill()
    full()  # compiles prefill and decode
    return dict(prefill=prefill, full=full, first_call_s=time.perf_counter() - start)


def hf_runner(path: str, prompts: np.ndarray, new: int) -> dict:
    import torch
    import transformers

    model = transformers.Phi3ForCausalLM.from_pretrained(
        path, torch_dtype=torch.float32, attn_implementation="sdpa").eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False)
        assert out.shape[1] == ids.shape[1] + n

    run(new)  # warm-up
    return dict(prefill=lambda: run(1), full=lambda: run(new), first_call_s=None)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--single-thread", action="store_true",
                        help="one compute thread per engine (torch.set_num_threads(1), XLA's "
                             "Eigen pool off): fair numbers on a shared, oversubscribed box, "
                             "where spinning OpenMP threads slow torch down ~10x")
    args = parser.parse_args()
    if args.single_thread:  # before jax is imported
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false").strip()

    import jax
    import torch
    import transformers

    if args.single_thread:
        torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = transformers.Phi3Config(**SMALL)
        transformers.Phi3ForCausalLM(config).save_pretrained(tmp)
        for batch in args.batch:
            prompts = np.random.RandomState(batch).randint(3, SMALL["vocab_size"],
                                                           (batch, args.prompt))
            runners = {"phi3-jax": jax_runner(tmp, prompts, args.new),
                       "transformers": hf_runner(tmp, prompts, args.new)}
            times = {name: {"prefill": [], "full": []} for name in runners}
            for _ in range(args.repeats):  # interleaved, so both see the same disturbances
                for name, r in runners.items():
                    for part in ("prefill", "full"):
                        times[name][part].append(timed(r[part]))
            for name, r in runners.items():
                prefill, full = min(times[name]["prefill"]), min(times[name]["full"])
                rows.append(dict(
                    engine=name, batch=batch, prompt=args.prompt, new=args.new,
                    prefill_tok_s=batch * args.prompt / prefill,
                    decode_tok_s=batch * (args.new - 1) / (full - prefill),
                    first_call_s=r["first_call_s"]))

    print(f"{'engine':<13}{'batch':>6}{'prompt':>7}{'new':>5}{'prefill tok/s':>15}"
          f"{'decode tok/s':>14}{'first call s':>14}")
    for r in rows:
        first = "" if r["first_call_s"] is None else f"{r['first_call_s']:.1f}"
        print(f"{r['engine']:<13}{r['batch']:>6}{r['prompt']:>7}{r['new']:>5}"
              f"{r['prefill_tok_s']:>15.0f}{r['decode_tok_s']:>14.1f}{first:>14}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    print(json.dumps(dict(
        benchmark="generate", config=SMALL, rows=rows, device=str(jax.devices()[0]),
        cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
        jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__,
        torch_threads=torch.get_num_threads(), single_thread=args.single_thread,
        load_average=os.getloadavg(), commit=commit)))


if __name__ == "__main__":
    main()
