"""Plots decode tok/s against batch size from bench_gpu.py's JSON line (needs matplotlib).

    python benchmarks/plot_gpu.py benchmarks/gpu_decode.png RESULT.json [MORE.json ...]

With several results, each series comes from the last file that has it (for example this
stop's phi3-jax rows over an earlier run's transformers rows); the title names every source.
A file is a bench_gpu JSON line, or a JSON object whose "bench_rows" holds {"commit", "rows"}.
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


def load(path: str) -> dict:
    with open(path) as f:
        text = f.read().strip()
    try:
        result = json.loads(text)
    except json.JSONDecodeError:
        result = json.loads(text.splitlines()[-1])
    return result.get("bench_rows", result)


def main(dst: str, sources: list[str], ctx: int = 1024) -> None:
    results = [load(src) for src in sources]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sources: dict[str, list[str]] = {}  # commit -> engines plotted from that run
    for engine, case, label in SERIES:
        for result in reversed(results):
            points = sorted((r["batch"], r["tok_s"]) for r in result["rows"]
                            if r.get("engine") == engine and r.get("case") == case
                            and r.get("ctx") == ctx and "tok_s" in r)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=label)
                engines = sources.setdefault(result["commit"], [])
                if engine not in engines:
                    engines.append(engine)
                break
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    runs = "; ".join(f"{commit}: {', '.join(engines)}" for commit, engines in sources.items())
    ax.set_title(f"Phi-3-mini bf16 decode, {ctx}-token context, H100\n(runs: {runs})",
                 fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
