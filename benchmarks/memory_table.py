"""Memory per device under tensor parallelism, computed (not measured) from shapes.

For each model and model-axis size, the parameters come from nnx.eval_shape (nothing is
allocated) and the KV cache from jax.eval_shape; phi3_jax.sharding gives each array's
NamedSharding, and every device's bytes are the sum of its shards (replicated arrays counted
whole). Weights in bf16; the KV cache (k, v and positions) for batch 1 and 1024 tokens in bf16.
Activations, compiler scratch and framework overhead are not included.

A second table gives the weights on one device under bf16, int8 and int4 (phi3_jax.quantize;
int4 in groups of 128, bf16 scales, embedding and head in bf16 or quantized too), for
Phi-3-mini, Phi-3-medium and Phi-4, in GB (10^9 bytes).

Runs on CPU with 8 fake devices by default (only the mesh's shape matters):
    python benchmarks/memory_table.py [--config path/to/config.json ...]
Prints a markdown table, then one JSON line.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp

from phi3_jax import sharding
from phi3_jax.cache import KVCache
from phi3_jax.config import Phi3Config
from phi3_jax.model import abstract_model
from phi3_jax.quantize import Quantization

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "configs"
DEFAULT_CONFIGS = {"Phi-3-medium": FIXTURES / "phi3_medium_4k.json",
                   "Phi-4": FIXTURES / "phi4.json"}
QUANTIZED_CONFIGS = {"Phi-3-mini": FIXTURES / "phi3_mini_4k.json", **DEFAULT_CONFIGS}
# (label, quantization): every scheme, int4 with and without its embeddings quantized.
WEIGHT_FORMATS = (("bf16", None), ("int8", Quantization("int8")),
                  ("int8 + embeddings", Quantization("int8", embeddings=True)),
                  ("int4", Quantization("int4")),
                  ("int4 + embeddings", Quantization("int4", embeddings=True)))
GB = 1e9
MODEL_SIZES = (1, 2, 4, 8)
CACHE_TOKENS = 1024
GIB, MIB = 2**30, 2**20


def rows_for(name: str, config: Phi3Config) -> list[dict]:
    _, params = abstract_model(config, "bfloat16")
    cache = jax.eval_shape(lambda: KVCache.init(config, 1, CACHE_TOKENS, jnp.bfloat16))
    rows = []
    for m in MODEL_SIZES:
        mesh = sharding.make_mesh({"data": 1, "model": m}, devices=jax.devices()[:m])
        weights = sharding.bytes_per_device(params, sharding.param_shardings(params, mesh))
        kv = sharding.bytes_per_device(cache, sharding.cache_shardings(cache, mesh))
        whole = sharding.kept_whole(sharding.config_axis_sizes(config), mesh)
        rows.append({"model": name, "model_axis": m, "weights_bytes": weights,
                     "kv_cache_bytes_per_1k_tokens": kv,
                     "attention_split": "kv_heads" not in whole,
                     "kv_heads": config.num_key_value_heads,
                     "replicated_axes": sorted(whole)})
    return rows


def weight_rows(name: str, config: Phi3Config) -> list[dict]:
    """Weight bytes on one device per format (abstract: nothing is allocated)."""
    rows = []
    for label, quantization in WEIGHT_FORMATS:
        _, params = abstract_model(config, "bfloat16", quantization=quantization)
        total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
        rows.append({"model": name, "format": label, "weights_bytes": int(total)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", default=None, metavar="CONFIG_JSON",
                        help="a config.json to tabulate (repeatable); default: Phi-3-medium, "
                             "Phi-4")
    args = parser.parse_args()
    configs = ({pathlib.Path(p).parent.name or p: p for p in args.config} if args.config
               else DEFAULT_CONFIGS)
    if jax.device_count() < max(MODEL_SIZES):
        raise SystemExit(f"needs {max(MODEL_SIZES)} devices (fake CPU devices are fine); "
                         f"found {jax.device_count()}")
    rows = [row for name, path in configs.items()
            for row in rows_for(name, Phi3Config.from_hf(path))]

    print("| model | mesh | weights per device (bf16) | KV cache per 1k tokens per device "
          "(bf16, batch 1) | attention and KV cache |")
    print("|---|---|---:|---:|---|")
    for r in rows:
        m, K = r["model_axis"], r["kv_heads"]
        attention = ("one device" if m == 1 else f"split ({K // m} KV heads per device)"
                     if r["attention_split"] else f"replicated ({K} KV heads do not divide)")
        print(f"| {r['model']} | model={r['model_axis']} | {r['weights_bytes'] / GIB:.2f} GiB "
              f"| {r['kv_cache_bytes_per_1k_tokens'] / MIB:.1f} MiB | {attention} |")
    weights = [row for name, path in QUANTIZED_CONFIGS.items()
               for row in weight_rows(name, Phi3Config.from_hf(path))]
    print("\n| model | " + " | ".join(label for label, _ in WEIGHT_FORMATS) + " |")
    print("|---|" + "---:|" * len(WEIGHT_FORMATS))
    for name in QUANTIZED_CONFIGS:
        cells = [f"{r['weights_bytes'] / GB:.2f} GB" for r in weights if r["model"] == name]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(json.dumps({"benchmark": "memory_table", "jax": jax.__version__,
                      "cache_tokens": CACHE_TOKENS, "dtype": "bfloat16", "rows": rows,
                      "weights_by_format": weights}))


if __name__ == "__main__":
    main()
