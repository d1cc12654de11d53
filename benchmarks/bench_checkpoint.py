"""What checksums cost a training checkpoint: save and verified restore vs Orbax alone.

Builds a TrainState like a full fine-tuning run's (fp32 parameters and AdamW's two moments, in
Phi-3-mini's embedding and layer shapes, 1 layer by default: 2.6 GB in all; values N(0, 0.02),
so zstd sees realistic entropy), then, alternating, best of `--runs` each:
- save: `phi3_jax.train.checkpoint.Checkpointer.save` + wait (Orbax writes, then the checksums
  of every file are taken in Orbax's background thread before the commit) against a bare
  `orbax.checkpoint.CheckpointManager` with the same items and options;
- restore: `Checkpointer.restore` (every file hashed first, then restored) against the bare
  manager's restore.
The files are in the page cache throughout (just written), as they are for a resume soon after
a save; hashing then costs CPU, not disk. CPU time (all threads: getrusage) is reported beside
wall time: on a shared machine it is the steadier measure. Prints a table, then one JSON line;
deletes its files.

    python benchmarks/bench_checkpoint.py [--layers 1] [--runs 2] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
from machine import cpu_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

D, F, V = 3072, 8192, 32064


def train_state(layers: int, seed: int = 0):
    import jax
    import jax.numpy as jnp
    import optax

    from phi3_jax.train.step import TrainState

    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(32 * 2**20, np.float32) * 0.02)

    def noise(*shape):
        n = int(np.prod(shape))
        start = int(rng.integers(0, pool.size - n)) if n < pool.size else 0
        out = np.resize(pool[start:start + n], n)
        return jnp.asarray(out.reshape(shape))

    params = {"embed": noise(V, D), "layers": [
        {"qkv": noise(D, 3 * D), "o": noise(D, D), "gate_up": noise(D, 2 * F),
         "down": noise(F, D)} for _ in range(layers)]}
    opt = optax.adam(1e-4).init(params)
    opt = jax.tree.map(lambda x: noise(*x.shape) if x.ndim else x, opt)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt,
                      rng=jnp.zeros((2,), jnp.uint32))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()

    import jax
    import orbax.checkpoint as ocp

    from phi3_jax.train.checkpoint import Checkpointer, abstract_like

    state = jax.block_until_ready(train_state(args.layers))
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    abstract = abstract_like(jax.eval_shape(lambda s: s, state), None)
    fingerprint = {"bench": True}
    work = tempfile.mkdtemp(prefix="bench_checkpoint-", dir=args.dir)
    times: dict[str, list[float]] = {k: [] for k in ("save", "save_bare", "restore",
                                                      "restore_bare")}
    cpu: dict[str, list[float]] = {k: [] for k in times}

    def timed(key, fn):
        t, c = time.perf_counter(), _cpu()
        fn()
        times[key].append(time.perf_counter() - t)
        cpu[key].append(_cpu() - c)

    try:
        for run in range(args.runs):
            ours = Checkpointer(os.path.join(work, f"ours{run}"), writer=True)
            bare = ocp.CheckpointManager(os.path.join(work, f"bare{run}"),
                                         options=ocp.CheckpointManagerOptions(max_to_keep=2))
            save_ours = functools.partial(_save_and_wait, ours, state, fingerprint)
            save_bare = functools.partial(_save_and_wait, bare, state, None)
            timed("save", save_ours)
            timed("save_bare", save_bare)
            timed("restore", functools.partial(
                lambda c: jax.block_until_ready(c.restore(abstract, fingerprint)[0]), ours))
            timed("restore_bare", functools.partial(lambda m: jax.block_until_ready(m.restore(
                0, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state),
                bare))
            ours.close()
            bare.close()
        stored = sum(os.path.getsize(os.path.join(d, f))
                     for d, _, files in os.walk(os.path.join(work, "ours0")) for f in files)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = {k: min(v) for k, v in times.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}

    def row(key: str, peer: str | None) -> str:
        text = f"{best[key]:.2f} s wall, {best_cpu[key]:.2f} s CPU"
        if peer:
            text += (f" ({best[key] / best[peer] - 1:+.0%} wall, "
                     f"{best_cpu[key] / best_cpu[peer] - 1:+.0%} CPU)")
        return text

    rows = [("train state (fp32 params + Adam)", f"{nbytes / 1e9:.2f} GB, {stored / 1e9:.2f} GB "
                                                 f"on disk (zstd)"),
            ("save + wait, Orbax alone", row("save_bare", None)),
            ("save + wait, checksummed", row("save", "save_bare")),
            ("restore, Orbax alone", row("restore_bare", None)),
            ("restore, verified", row("restore", "restore_bare"))]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps({"bench": "checkpoint_checksums", "layers": args.layers,
                      "state_bytes": nbytes, "stored_bytes": stored,
                      **{f"{k}_s": round(v, 3) for k, v in best.items()},
                      **{f"{k}_cpu_s": round(v, 3) for k, v in best_cpu.items()},
                      "runs": args.runs, "loadavg_1m": round(os.getloadavg()[0], 2),
                      "cpu": cpu_model(), "cores": os.cpu_count(),
                      "python": platform.python_version(), "jax": jax.__version__,
                      "orbax_checkpoint": ocp.__version__}))
    return 0


def _save_and_wait(checkpointer, state, fingerprint) -> None:
    """Checkpointer.save (fingerprint given) or the bare CheckpointManager's, then the wait."""
    import orbax.checkpoint as ocp

    if fingerprint is not None:
        checkpointer.save(state, 0, fingerprint)
        checkpointer.wait()
        return
    checkpointer.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave({"x": 0})))
    checkpointer.wait_until_finished()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    sys.exit(main())
