"""Checkpoint conversion: Hugging Face safetensors <-> phi3-jax Orbax checkpoints.

`convert(hf_dir, out_dir, dtype=None, force=False)` streams a Hugging Face folder into an Orbax
checkpoint that `phi3_jax.load` restores (sharded, with a mesh); `export(orbax_dir, hf_dir,
max_shard_size="2GB", force=False)` writes it back as safetensors for transformers. Both write
into a temporary folder and rename it into place only when complete. The `phi3-jax convert` and
`phi3-jax export` commands are in convert.cli.
"""

from convert.hf_to_orbax import convert
from convert.orbax_to_hf import export

__all__ = ["convert", "export"]
