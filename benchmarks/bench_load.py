"""What the finite check costs at load: `phi3_jax.load` with and without `allow_nonfinite`.

Writes a synthetic Hugging Face checkpoint with Phi-3-mini's layer shapes (bf16, normal values
of std 0.02; 2 layers by default, 0.85 GB), converts it to an Orbax checkpoint, then loads each
in-process, alternating checked and unchecked loads (`--repeats` of each), from a warm page
cache: the check's cost is then all compute, nothing hidden behind the disk. Reported: the best
time of each, the difference, and the check alone over the memory-mapped tensors (GB/s).

`load` checks every array on device as it is placed, one reduction per array
(phi3_jax.finite.nonfinite_on_device), for both formats; "device check alone" times that over
the restored arrays. `convert` and `export` check host arrays as they stream
(phi3_jax.finite.first_nonfinite, chunked, on the raw bits); "host check alone" times that over
the memory-mapped tensors.

Prints a table, then one JSON line; deletes everything it wrote.

    python benchmarks/bench_load.py                  # 2 layers, 0.85 GB, 3 repeats
    python benchmarks/bench_load.py --layers 6 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from bench_convert import git_head, write_source  # puts the working tree's phi3_jax first
from machine import cpu_model


def best_load(path: str, dtype: str, repeats: int) -> dict[bool, tuple[float, float]]:
    """Best (wall, CPU) seconds of load(path) with the check on (False) and off (True),
    interleaved. CPU time (all threads) is the steadier figure on a shared machine."""
    import jax

    import phi3_jax

    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    phi3_jax.load(path, dtype=dtype)  # warm the page cache, the imports and the jit caches
    for _ in range(repeats):
        for allow in (False, True):
            start, cpu = time.perf_counter(), time.process_time()
            model = phi3_jax.load(path, dtype=dtype, allow_nonfinite=allow)
            jax.block_until_ready(model.params)
            times[allow].append((time.perf_counter() - start, time.process_time() - cpu))
            del model
    return {allow: (min(w for w, _ in t), min(c for _, c in t)) for allow, t in times.items()}


def check_alone(path: str) -> tuple[float, int]:
    """Seconds for the host check over every tensor of the HF folder (warm), and the bytes."""
    from phi3_jax.finite import first_nonfinite
    from phi3_jax.hf_weights import HFCheckpoint

    checkpoint = HFCheckpoint(path)
    names = list(checkpoint.location)
    total = sum(checkpoint.nbytes(n) for n in names)
    start = time.perf_counter()
    for name in names:
        assert first_nonfinite(checkpoint[name]) is None
    return time.perf_counter() - start, total


def device_check_alone(path: str, repeats: int) -> float:
    """Best seconds of the device check over an Orbax checkpoint's restored bf16 arrays."""
    import jax

    import phi3_jax
    from phi3_jax.finite import check_on_device

    leaves = jax.tree.leaves(phi3_jax.load(path, dtype="bfloat16", allow_nonfinite=True).params)
    names = [str(i) for i in range(len(leaves))]
    check_on_device(leaves, names, path)  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        check_on_device(leaves, names, path)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()

    import jax

    from convert import convert

    root = tempfile.mkdtemp(prefix="bench_load-", dir=args.dir)
    try:
        hf, orbax = os.path.join(root, "hf"), os.path.join(root, "orbax")
        size, _ = write_source(hf, args.layers, seed=0)
        convert(hf, orbax, progress=False)
        rows = {}
        for label, path, dtype in (("HF bf16 -> bf16", hf, "bfloat16"),
                                   ("HF bf16 -> f32", hf, "float32"),
                                   ("Orbax bf16 -> bf16", orbax, "bfloat16")):
            rows[label] = best_load(path, dtype, args.repeats)
        alone, nbytes = check_alone(hf)
        device_alone = device_check_alone(orbax, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"checkpoint: {size / 1e9:.2f} GB bf16, {args.layers} layers of Phi-3-mini shapes; "
          f"best of {args.repeats}, warm page cache, {jax.devices()[0].platform}")
    print(f"{'load':20} {'wall: checked':>14} {'unchecked':>10} {'cost':>7}   "
          f"{'CPU: checked':>13} {'unchecked':>10} {'cost':>7}")
    record = {"bench": "load_finite_check", "layers": args.layers, "bytes": size}
    for label, t in rows.items():
        (wall, cpu), (wall0, cpu0) = t[False], t[True]
        print(f"{label:20} {wall:13.2f}s {wall0:9.2f}s {wall - wall0:+6.2f}s   "
              f"{cpu:12.2f}s {cpu0:9.2f}s {cpu - cpu0:+6.2f}s")
        key = label.split()[0].lower() + "_" + label.split()[-1]
        record |= {f"{key}_checked_s": round(wall, 3), f"{key}_unchecked_s": round(wall0, 3),
                   f"{key}_checked_cpu_s": round(cpu, 3), f"{key}_unchecked_cpu_s": round(cpu0, 3)}
    print(f"host check alone     {alone:8.2f}s  ({nbytes / alone / 1e9:.1f} GB/s)")
    print(f"device check alone   {device_alone:8.2f}s  ({nbytes / device_alone / 1e9:.1f} GB/s)")
    record |= {"check_alone_s": round(alone, 3), "check_gb_per_s": round(nbytes / alone / 1e9, 2),
               "device_check_alone_s": round(device_alone, 3),
               "cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__,
               "loadavg_1m": round(os.getloadavg()[0], 2), "commit": git_head()}
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
