"""Host time of the public calls: what generate() and logits() cost besides the device's work.

On an accelerator the Python side (request preparation, jit dispatch with its static-argument
hashing and pytree flattening, host syncs) adds to every time to first token and, when
streaming, to every token. Here the model has Phi-3-mini's 32 layers (the parameter tree and
graph a real checkpoint has) but tiny widths, so the compute is small and the wall time is
mostly host work: an upper bound on the host time of a real model's calls.

    python benchmarks/bench_host.py [--layers 32] [--runs 15]
    python benchmarks/bench_host.py --tiny          # CI smoke run

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
import numpy as np

from benchmarks.bench_gpu import TINY, git_head, random_model
from benchmarks.machine import cpu_model, print_result
from phi3_jax.api import Phi3
from phi3_jax.config import Phi3Config

STREAMED = 16  # new tokens of the streamed call: one decode dispatch and host sync each


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="2 layers, 3 runs (CI)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    layers, runs = (2, 3) if args.tiny else (args.layers, args.runs)
    config = Phi3Config.from_hf(dict(TINY, model_type="phi3", num_hidden_layers=layers))
    graphdef, params = random_model(config)
    model = Phi3(config, graphdef, params, generation_config={})
    prompt = np.random.RandomState(0).randint(3, TINY["vocab_size"] - 1, 50).tolist()
    calls = {
        "generate, 1 new token": lambda: model.generate(
            prompt, max_new_tokens=1, temperature=0.0, stop_token_ids=[]),
        f"generate, {STREAMED} streamed": lambda: model.generate(
            prompt, max_new_tokens=STREAMED, temperature=0.0, stop_token_ids=[],
            stream=lambda chunk: None),
        "logits": lambda: jax.block_until_ready(model.logits([prompt])),
    }
    rows = []
    print(f"{'call':24} {'median ms':>10} {'min ms':>8}")
    for name, call in calls.items():
        call()  # compiles
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        # The minimum too: host work is what remains when nothing else competes for the cores.
        ms, best = statistics.median(times) * 1e3, min(times) * 1e3
        rows.append(dict(call=name, ms=ms, min_ms=best))
        print(f"{name:24} {ms:10.2f} {best:8.2f}", flush=True)
    result = {"bench": "host", "tiny": args.tiny, "layers": layers, "runs": runs,
              "streamed": STREAMED, "backend": jax.default_backend(), "device": cpu_model(),
              "cores": os.cpu_count(), "loadavg_1m": os.getloadavg()[0],
              "jax": jax.__version__, "commit": git_head(), "rows": rows}
    print_result(result, args.out, "bench_host.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
