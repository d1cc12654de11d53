"""One process of the multi-host test (tests/test_multihost.py), and the greedy helper both
test files share.

Run as a script it joins a jax.distributed job, builds a mesh over every process's devices,
loads the checkpoint straight onto it, and writes its greedy tokens, logits and what it holds
locally to OUT_DIR/process_<id>.npz.
"""

from __future__ import annotations

import os
import sys

import numpy as np


def greedy(model, prompts: np.ndarray, steps: int) -> list[list[int]]:
    """Greedy continuations of [B, T] prompts through the public API (model.generate), which
    places the batch and the KV cache with phi3_jax.sharding when the model has a mesh."""
    out = model.generate([row.tolist() for row in np.asarray(prompts)], max_new_tokens=steps,
                         temperature=0.0)
    return [c.token_ids for c in out]


def prompts_for(vocab_size: int, batch: int = 4, length: int = 7, seed: int = 1) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, vocab_size, (batch, length))


def main(argv: list[str]) -> int:
    ckpt, out_dir, mesh_spec, coordinator, num_processes, process_id = argv
    from phi3_jax import sharding

    # Before any device is touched: join the job (gloo carries CPU collectives across processes).
    sharding.initialize_distributed(coordinator, int(num_processes), int(process_id))
    import jax

    import phi3_jax

    mesh = sharding.make_mesh(mesh_spec)
    model = phi3_jax.load(ckpt, mesh=mesh)
    prompts = prompts_for(model.config.vocab_size)
    tokens = greedy(model, prompts, steps=6)
    logits = sharding.to_host(model.logits(prompts))
    # What this process holds: the shard shape on each of its devices, per parameter.
    local = {}
    for path, var in nnx_flat(model.params):
        array = var.get_value()
        local[path] = [(s.device.process_index, tuple(s.data.shape))
                       for s in array.addressable_shards]
    np.savez(os.path.join(out_dir, f"process_{jax.process_index()}.npz"),
             tokens=np.array(repr(tokens)), logits=logits, process_count=jax.process_count(),
             local_devices=jax.local_device_count(), global_devices=jax.device_count(),
             local=np.array(repr(local)))
    return 0


def nnx_flat(state):
    from flax import nnx

    return [(".".join(map(str, path)), var) for path, var in nnx.to_flat_state(state)]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
