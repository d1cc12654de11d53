"""One process of the multi-host test (tests/test_multihost.py), and the greedy decoder both
test files share.

Run as a script it joins a jax.distributed job, builds a mesh over every process's devices,
loads the checkpoint straight onto it, and writes its greedy tokens, logits and what it holds
locally to OUT_DIR/process_<id>.npz.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np


def greedy(model, prompts: np.ndarray, steps: int) -> np.ndarray:
    """[B, T] unpadded prompts -> [B, steps] greedy tokens, decoded with a KV cache whose
    shardings come from phi3_jax.sharding (interim, until phi3_jax.generate lands)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from phi3_jax import sharding
    from phi3_jax.cache import KVCache

    config, mesh = model.config, model.mesh
    B, T = prompts.shape
    tokens = np.asarray(prompts, np.int32)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
    if mesh is None:
        cache_sh = token_sh = None
        tokens, positions = jnp.asarray(tokens), jnp.asarray(positions)
    else:
        sharding.check_mesh_fits(config, mesh, batch=B)
        cache_sh = sharding.cache_shardings(config, mesh)
        token_sh = sharding.batch_sharding(mesh, 2)
        tokens = sharding.shard_batch(tokens, mesh)
        positions = sharding.shard_batch(positions, mesh)

    # Explicit output shardings keep the cache where it started, so the step compiles once for
    # the prefill and once for decoding.
    placed = {} if mesh is None else {"out_shardings": (token_sh, token_sh, cache_sh)}
    make_cache = jax.jit(lambda: KVCache.init(config, B, T + steps, model.dtype),
                         **({} if mesh is None else {"out_shardings": cache_sh}))

    @functools.partial(jax.jit, static_argnums=0, donate_argnums=2, **placed)
    def step(graphdef, params, cache, tokens, positions):
        logits, cache = nnx.merge(graphdef, params)(tokens, positions, cache)
        next_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]  # [B, 1]
        return next_token, positions[:, -1:] + 1, cache

    cache = make_cache()
    out = []
    for _ in range(steps):
        tokens, positions, cache = step(model.graphdef, model.params, cache, tokens, positions)
        out.append(tokens)
    return np.concatenate([sharding.to_host(t) for t in out], axis=1)


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
    np.savez(os.path.join(out_dir, f"process_{jax.process_index()}.npz"), tokens=tokens,
             logits=logits, process_count=jax.process_count(),
             local_devices=jax.local_device_count(), global_devices=jax.device_count(),
             local=np.array(repr(local)))
    return 0


def nnx_flat(state):
    from flax import nnx

    return [(".".join(map(str, path)), var) for path, var in nnx.to_flat_state(state)]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
