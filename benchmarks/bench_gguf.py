"""GGUF import and export at Phi-3-mini's layer shapes: wall time and peak memory.

Writes a synthetic Phi-3 GGUF (D=3072, F=8192, 32 heads, V=32064, untied; 8 layers instead of 32
by default) in the type Ollama ships (q4_0 by default; --type q8_0 / f16), with the `gguf`
package, its blocks random bytes under one valid float16 scale (the time to dequantize does not
depend on the values), and a small SentencePiece-style vocabulary padded to V. Then runs, each in
a fresh process under `/usr/bin/time -v` (peak RSS includes mapped file pages):

    phi3-jax convert model.gguf OUT --dtype bfloat16 --quiet     (dequantize, Orbax write)
    phi3-jax export OUT back.gguf --type q8_0 --quiet            (with --export: quantize back)

Throughput = GGUF file bytes (import) or bf16 checkpoint bytes (export) / wall time of the whole
command, interpreter start and imports included. Prints a table, then one JSON line; deletes
everything it wrote.

    python benchmarks/bench_gguf.py                       # 8 layers, q4_0
    python benchmarks/bench_gguf.py --layers 4 --type q8_0 --export
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

import numpy as np
from machine import cpu_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

D, F, N, V = 3072, 8192, 32, 32064


def write_gguf(path: str, layers: int, qtype_name: str) -> int:
    import gguf

    rng = np.random.default_rng(0)
    Q = gguf.GGMLQuantizationType
    qtype = Q[qtype_name.upper()]
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_name("Phi-3 synthetic")
    writer.add_context_length(4096)
    writer.add_rope_scaling_orig_ctx_len(4096)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(F)
    writer.add_block_count(layers)
    writer.add_head_count(N)
    writer.add_head_count_kv(N)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(D // N)
    writer.add_rope_freq_base(10000.0)
    writer.add_sliding_window(2047)
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)),
              *("\u2581" + chr(0x61 + i % 26) * (1 + i // 26) for i in range(200))]
    specials = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
    tokens = pieces + specials + [f"[PAD{i}]" for i in range(len(pieces) + len(specials), V)]
    types = [2, 3, 3] + [6] * 256 + [1] * 200 + [3] * len(specials)
    types += [5] * (V - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-float(i) for i in range(V)])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(len(pieces))

    scale = np.array([0.002], np.float16).view(np.uint8)

    def tensor(name: str, shape: tuple[int, ...], kind=None) -> None:
        kind = kind or (qtype if len(shape) == 2 else Q.F32)
        if kind == Q.F32:
            writer.add_tensor(name, np.ones(shape, np.float32))
            return
        if kind == Q.F16:
            writer.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float16))
            return
        block, type_size = gguf.GGML_QUANT_SIZES[kind]
        data = rng.integers(0, 256, size=(shape[0], shape[1] // block * type_size), dtype=np.uint8)
        blocks = data.reshape(shape[0], -1, type_size)
        if kind == Q.Q6_K:
            blocks[..., -2:] = scale  # a q6_K block ends with its float16 super-scale
        else:
            blocks[..., :2] = scale  # q4_0 / q8_0 blocks start with their float16 scale
        writer.add_tensor(name, data, raw_dtype=kind)

    tensor("token_embd.weight", (V, D))
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (D,))
        tensor(f"blk.{i}.attn_qkv.weight", (3 * D, D))
        tensor(f"blk.{i}.attn_output.weight", (D, D))
        tensor(f"blk.{i}.ffn_norm.weight", (D,))
        tensor(f"blk.{i}.ffn_up.weight", (2 * F, D))
        tensor(f"blk.{i}.ffn_down.weight", (D, F))
    tensor("output_norm.weight", (D,))
    tensor("output.weight", (V, D), Q.Q6_K if qtype == Q.Q4_0 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.path.getsize(path)


def timed(argv: list[str]) -> dict:
    result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "phi3_jax.cli", *argv],
                            capture_output=True, text=True,
                            cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])

    def field(name: str) -> str:
        return re.search(rf"{re.escape(name)}: (.*)", result.stderr).group(1)

    minutes, seconds = field("Elapsed (wall clock) time (h:mm:ss or m:ss)").split(":")[-2:]
    return {"wall_s": 60 * float(minutes) + float(seconds),
            "cpu_s": float(field("User time (seconds)")) + float(field("System time (seconds)")),
            "peak_rss_gb": int(field("Maximum resident set size (kbytes)")) * 1024 / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--type", default="q4_0", choices=("q4_0", "q8_0", "f16"))
    parser.add_argument("--export", action="store_true", help="also time export to q8_0")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-gguf-", dir=args.dir)
    try:
        source = os.path.join(work, "model.gguf")
        size = write_gguf(source, args.layers, args.type)
        load = os.getloadavg()[0]
        imported = timed(["convert", source, os.path.join(work, "orbax"), "--dtype", "bfloat16",
                          "--quiet"])
        with open(os.path.join(work, "orbax", "phi3_jax.json")) as f:
            meta = json.load(f)
        rows = [("GGUF file", f"{size / 1e9:.2f} GB, {args.type}, {args.layers} layers"),
                ("checkpoint written", f"{meta['bytes'] / 1e9:.2f} GB bfloat16"),
                ("largest tensor (bf16)", f"{V * D * 2 / 1e6:.0f} MB"),
                ("convert: wall / CPU", f"{imported['wall_s']:.1f} s / {imported['cpu_s']:.1f} s"),
                ("convert: peak RSS", f"{imported['peak_rss_gb']:.2f} GB"),
                ("convert: throughput", f"{size / imported['wall_s'] / 1e6:.0f} MB/s of GGUF")]
        result = {"layers": args.layers, "type": args.type, "gguf_bytes": size,
                  "convert": imported}
        if args.export:
            exported = timed(["export", os.path.join(work, "orbax"),
                              os.path.join(work, "out", "back.gguf"), "--type", "q8_0", "--quiet"])
            rows += [("export q8_0: wall / CPU",
                      f"{exported['wall_s']:.1f} s / {exported['cpu_s']:.1f} s"),
                     ("export q8_0: peak RSS", f"{exported['peak_rss_gb']:.2f} GB"),
                     ("export q8_0: throughput",
                      f"{meta['bytes'] / exported['wall_s'] / 1e6:.0f} MB/s of bf16")]
            result["export_q8_0"] = exported
        rows.append(("load average (1 min)", f"{load:.1f} before, {os.getloadavg()[0]:.1f} after"))
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
        result.update(cpu=cpu_model(), cores=os.cpu_count(), python=platform.python_version())
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
