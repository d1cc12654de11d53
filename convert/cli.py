"""`phi3-jax convert` (Hugging Face -> Orbax) and `phi3-jax export` (Orbax -> Hugging Face)."""

from __future__ import annotations

import argparse
import sys

from phi3_jax.api import DTYPES


def run_convert(args: argparse.Namespace) -> int:
    from convert import convert

    meta = convert(args.hf_dir, args.out_dir, dtype=args.dtype, force=args.force,
                   progress=not args.quiet)
    rate = meta["bytes"] / max(meta["seconds"], 1e-9) / 1e6
    print(f"converted {meta['tensor_count']} tensors ({meta['bytes'] / 1e9:.2f} GB "
          f"{meta['dtype']}) to {args.out_dir} in {meta['seconds']:.1f} s ({rate:.0f} MB/s)",
          file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from convert import export

    files = export(args.orbax_dir, args.hf_dir, max_shard_size=args.max_shard_size,
                   force=args.force, progress=not args.quiet)
    shards = [f for f in files if f.endswith(".safetensors")]
    print(f"exported {args.orbax_dir} to {args.hf_dir} ({len(shards)} safetensors file"
          f"{'s' if len(shards) > 1 else ''})", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to an Orbax one",
                       description="Streams a Hugging Face Phi-3 folder (safetensors, single or "
                       "sharded) into a phi3-jax Orbax checkpoint, one tensor at a time.")
    p.add_argument("hf_dir", help="Hugging Face folder (config.json + safetensors)")
    p.add_argument("out_dir", help="Orbax checkpoint folder to create")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype to store (default: the checkpoint's own)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT_DIR if it exists (only once the new checkpoint is complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_convert)

    e = sub.add_parser("export", help="export an Orbax checkpoint as Hugging Face safetensors",
                       description="Writes a phi3-jax Orbax checkpoint as a Hugging Face folder "
                       "that transformers' from_pretrained loads.")
    e.add_argument("orbax_dir", help="phi3-jax Orbax checkpoint folder")
    e.add_argument("hf_dir", help="Hugging Face folder to create")
    e.add_argument("--max-shard-size", default="2GB",
                   help="largest safetensors file before sharding, e.g. 2GB, 500MB (default 2GB)")
    e.add_argument("--force", action="store_true",
                   help="replace HF_DIR if it exists (only once the export is complete)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=run_export)
