"""`phi3-jax convert` (Hugging Face or GGUF -> Orbax) and `phi3-jax export` (Orbax -> Hugging
Face, or a checkpoint -> GGUF)."""

from __future__ import annotations

import argparse
import sys

from phi3_jax import interrupts, quantize
from phi3_jax.params import COMPUTE_DTYPES

NONFINITE_HELP = "read weights that hold NaN or infinity (refused by default)"


def run_convert(args: argparse.Namespace) -> int:
    from convert import convert

    with interrupts.command():
        meta = convert(args.hf_dir, args.out_dir, dtype=args.dtype, force=args.force,
                       progress=not args.quiet, allow_nonfinite=args.allow_nonfinite,
                       **quantize.from_args(args))
    rate = meta["bytes"] / max(meta["seconds"], 1e-9) / 1e6
    stored = meta.get("quantization")
    kind = meta["dtype"] if stored is None else f"{stored['scheme']}, others {meta['dtype']}"
    print(f"converted {meta['tensor_count']} tensors ({meta['bytes'] / 1e9:.2f} GB "
          f"{kind}) to {args.out_dir} in {meta['seconds']:.1f} s ({rate:.0f} MB/s)",
          file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    if args.hf_dir.endswith(".gguf"):
        return run_export_gguf(args)
    from convert import export

    with interrupts.command():
        files = export(args.orbax_dir, args.hf_dir, max_shard_size=args.max_shard_size,
                       force=args.force, progress=not args.quiet,
                       allow_nonfinite=args.allow_nonfinite)
    shards = [f for f in files if f.endswith(".safetensors")]
    print(f"exported {args.orbax_dir} to {args.hf_dir} ({len(shards)} safetensors file"
          f"{'s' if len(shards) > 1 else ''})", file=sys.stderr)
    return 0


def run_export_gguf(args: argparse.Namespace) -> int:
    from phi3_jax.gguf import export_gguf

    files = export_gguf(args.orbax_dir, args.hf_dir, file_type=args.type, force=args.force,
                        progress=not args.quiet)
    print(f"exported {args.orbax_dir} to {files[0]} ({args.type})"
          + (f"; `ollama create NAME -f {files[1]}` makes it an Ollama model" if files[1:]
             else ""), file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint or a GGUF file to an "
                       "Orbax checkpoint",
                       description="Streams a Hugging Face Phi-3 folder (safetensors, single or "
                       "sharded), a llama.cpp GGUF file or an Ollama model into a phi3-jax Orbax "
                       "checkpoint, one tensor at a time.")
    p.add_argument("hf_dir", metavar="SOURCE",
                   help="Hugging Face folder (config.json + safetensors), model.gguf, or "
                   "ollama:NAME[:TAG] from the local Ollama store")
    p.add_argument("out_dir", help="Orbax checkpoint folder to create")
    p.add_argument("--dtype", choices=sorted(COMPUTE_DTYPES), default=None,
                   help="parameter dtype to store (default: the checkpoint's own; bfloat16 for "
                   "a quantized GGUF)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT_DIR if it exists (only once the new checkpoint is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--allow-nonfinite", action="store_true", help=NONFINITE_HELP)
    quantize.add_arguments(p)
    p.set_defaults(func=run_convert)

    e = sub.add_parser("export", help="export an Orbax checkpoint as Hugging Face safetensors "
                       "or as a GGUF file",
                       description="Writes a phi3-jax Orbax checkpoint as a Hugging Face folder "
                       "that transformers' from_pretrained loads or, when OUT ends in .gguf, a "
                       "checkpoint (Orbax or Hugging Face folder) as a GGUF file that llama.cpp "
                       "and Ollama run, with a Modelfile next to it for `ollama create`.")
    e.add_argument("orbax_dir", metavar="SOURCE",
                   help="phi3-jax Orbax checkpoint folder (for a .gguf OUT also a Hugging Face "
                   "folder, e.g. a fine-tune)")
    e.add_argument("hf_dir", metavar="OUT", help="Hugging Face folder to create, or OUT.gguf")
    e.add_argument("--type", choices=("f16", "q8_0", "q4_0", "bf16", "f32"), default="f16",
                   help="GGUF tensor type (default f16; q4_0 keeps the output head in q8_0)")
    e.add_argument("--max-shard-size", default="2GB",
                   help="largest safetensors file before sharding, e.g. 2GB, 500MB (default 2GB)")
    e.add_argument("--force", action="store_true",
                   help="replace HF_DIR if it exists (only once the export is complete)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--allow-nonfinite", action="store_true", help=NONFINITE_HELP)
    e.set_defaults(func=run_export)
