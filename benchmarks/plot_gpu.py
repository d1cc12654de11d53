"""Plots decode tok/s against batch size from bench_gpu.py's JSON line (needs matplotlib).

    python benchmarks/plot_gpu.py RESULT.json benchmarks/gpu_decode.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SERIES = [("phi3-jax", "decode_tight", "phi3-jax (cache = context)"),
          ("phi3-jax", "decode_generate", "phi3-jax generate() (bucketed cache)"),
          ("transformers-compiled", "compiled_decode", "transformers static cache + compile"),
          ("transformers", "eager_decode", "transformers eager SDPA")]


def main(src: str, dst: str, ctx: int = 1024) -> None:
    with open(src) as f:
        result = json.loads(f.read().strip().splitlines()[-1])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for engine, case, label in SERIES:
        points = sorted((r["batch"], r["tok_s"]) for r in result["rows"]
                        if r.get("engine") == engine and r.get("case") == case
                        and r.get("ctx") == ctx and "tok_s" in r)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"Phi-3-mini bf16 decode, {ctx}-token context, H100 (commit {result['commit']})",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
