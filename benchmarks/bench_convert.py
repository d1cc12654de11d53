"""Streaming conversion of a >= 4 GiB checkpoint: peak memory and throughput of `phi3-jax convert`.

Writes a synthetic Hugging Face checkpoint with Phi-3-mini's layer shapes (D=3072, F=8192, 32
heads, V=32064; bf16; fewer layers: 18 by default, 4.47 GB) sharded like the real ones (2 GB
files), then runs `phi3-jax convert` on it in a fresh process under `/usr/bin/time -v`, which
reports the peak resident set size (mapped file pages included) and the wall time. The values
are normally distributed like trained weights (std 0.02), so zstd sees realistic entropy.

The source files are flushed and evicted from the page cache before the run
(posix_fadvise DONTNEED), so the converter reads them from disk. Its output is not fsync'ed
(neither is the real command's). Throughput = source bytes / wall time of the whole command
(interpreter start and imports included); the command's own in-process rate is shown as well.

Prints a table, then one JSON line; deletes everything it wrote.

    python benchmarks/bench_convert.py                 # 18 layers, 4.47 GB
    python benchmarks/bench_convert.py --export        # also time `phi3-jax export` back
    python benchmarks/bench_convert.py --layers 4 --dir /data   # quick run elsewhere
    python benchmarks/bench_convert.py --checksums     # also the cost of the checksums

With --checksums it also times, in the same run, what the checksums cost: hashing the converted
folder as `convert` does when it finishes (its pages still cached), and, in a fresh process,
verifying it alone from a cold page cache, then `phi3_jax.load(..., dtype="bfloat16")` with and
without its verification (which runs before the restore), alternated, best of two each, warm.
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
import time

import numpy as np
from machine import cpu_model

# The working tree's phi3_jax, not an installed copy (which may be stale).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=(32000,), pad_token_id=32000)
GiB = 2**30


class Noise:
    """A bf16 tensor whose bytes are made only when the safetensors writer asks for them, cut
    from one shared block of normal noise at a random offset (generating 2e9 normals would take
    longer than the conversion being measured)."""

    def __init__(self, shape, pool, rng):
        self.shape, self.dtype, self.pool, self.rng = tuple(shape), pool.dtype, pool, rng

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        n = int(np.prod(self.shape))
        out = np.empty(n, self.dtype)
        filled = 0
        while filled < n:
            start = int(self.rng.integers(0, self.pool.size // 2))
            take = min(n - filled, self.pool.size - start)
            out[filled:filled + take] = self.pool[start:start + take]
            filled += take
        return out.reshape(self.shape)


def write_source(path: str, layers: int, seed: int) -> tuple[int, int]:
    """Writes the synthetic checkpoint; returns (total bytes, largest tensor bytes)."""
    import ml_dtypes

    from phi3_jax.config import Phi3Config
    from phi3_jax.hf_weights import tensor_specs, write_hf_tensors

    config = Phi3Config(**MINI, num_hidden_layers=layers)
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(64 * 2**20, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    tensors = [(s.hf_name, Noise(s.hf_shape, pool, rng)) for s in tensor_specs(config)]
    os.makedirs(path)
    write_hf_tensors(path, tensors, max_shard_size="2GB")
    hf = config.to_hf()
    hf["torch_dtype"] = "bfloat16"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    sizes = [t.nbytes for _, t in tensors]
    return sum(sizes), max(sizes)


def evict(path: str) -> None:
    """Flushes the files under `path` and drops them from the page cache."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(cmd: list[str]) -> dict:
    """Runs cmd under /usr/bin/time -v; returns peak RSS, wall time and the command's stderr."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)[1]) * 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr)[1]
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    inner = re.search(r"in ([\d.]+) s \(", proc.stderr)
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", proc.stderr)[1])
              for kind in ("User", "System"))
    return {"peak_rss": rss, "wall_s": seconds, "inner_s": float(inner[1]) if inner else None,
            "cpu_s": cpu, "load": os.getloadavg()[0]}


def spot_check(source: str, converted: str) -> int:
    """Compares a few converted tensors with the source, restored through Orbax."""
    from flax import nnx

    from phi3_jax import orbax_checkpoint as ock
    from phi3_jax.config import Phi3Config
    from phi3_jax.hf_weights import HFCheckpoint
    from phi3_jax.model import abstract_model

    config = Phi3Config.from_hf(source)
    checkpoint = HFCheckpoint(source)
    specs = checkpoint.check(config)
    _, abstract = abstract_model(config, "bfloat16")
    shapes = {p: tuple(v.shape) for p, v in nnx.to_flat_state(abstract)}
    picks = [specs[0], specs[2], specs[5], specs[-1]]  # embed, qkv, gate_up, head
    got = ock.restore_host(os.path.join(converted, ock.PARAMS_DIR), [s.path for s in picks],
                           shapes, np.dtype(checkpoint[specs[0].hf_name].dtype))
    for spec in picks:
        if not np.array_equal(got[spec.path], spec.to_jax(checkpoint[spec.hf_name])):
            raise SystemExit(f"{spec.hf_name} differs after conversion")
    return len(picks)


CHECKSUM_PROBE = """
import json, sys, time
from phi3_jax import orbax_checkpoint as ock
import phi3_jax
path = sys.argv[1]
meta = ock.read_metadata(path)
t = time.perf_counter(); ock.verify_checkpoint(path, meta); cold = time.perf_counter() - t
verify = ock.verify_checkpoint
times = {True: [], False: []}
for checked in (False, True, False, True):  # alternated, warm page cache
    ock.verify_checkpoint = verify if checked else (lambda *args: None)
    t = time.perf_counter(); phi3_jax.load(path, dtype="bfloat16")
    times[checked].append(time.perf_counter() - t)
ock.verify_checkpoint = verify
t = time.perf_counter(); ock.verify_checkpoint(path, meta); warm = time.perf_counter() - t
print(json.dumps({"verify_cold_s": cold, "verify_warm_s": warm, "load_s": min(times[True]),
                  "load_unverified_s": min(times[False])}))
"""


def checksum_costs(converted: str, convert_s: float) -> tuple[list, dict]:
    """What the checksums add to convert (hashing the fresh output) and to load (verifying)."""
    from phi3_jax import checksums

    t = time.perf_counter()
    checksums.record(converted)
    record_s = time.perf_counter() - t
    evict(converted)
    proc = subprocess.run([sys.executable, "-c", CHECKSUM_PROBE, converted], capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode != 0:
        raise SystemExit(f"checksum probe failed:\n{proc.stderr[-3000:]}")
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    share = record_s / (convert_s - record_s)
    extra = probe["load_s"] / probe["load_unverified_s"] - 1
    rows = [("hash output (in convert)", f"{record_s:.1f} s = {share:.0%} of the rest"),
            ("verify alone, cold / warm cache", f"{probe['verify_cold_s']:.1f} s / "
                                                f"{probe['verify_warm_s']:.1f} s"),
            ("load bf16 verified / unverified",
             f"{probe['load_s']:.1f} s / {probe['load_unverified_s']:.1f} s ({extra:+.0%})")]
    return rows, {"checksum_record_s": round(record_s, 2),
                  "checksum_verify_cold_s": round(probe["verify_cold_s"], 2),
                  "checksum_verify_warm_s": round(probe["verify_warm_s"], 2),
                  "load_bf16_s": round(probe["load_s"], 2),
                  "load_bf16_unverified_s": round(probe["load_unverified_s"], 2)}


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write (needs "
                        "about 2.1x the checkpoint size free)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--export", action="store_true", help="also time the export back to HF")
    parser.add_argument("--checksums", action="store_true",
                        help="also time hashing and verifying the converted checkpoint")
    args = parser.parse_args()
    if not os.path.exists("/usr/bin/time"):
        raise SystemExit("needs GNU time: apt-get install -y time")

    work = tempfile.mkdtemp(prefix="bench_convert-", dir=args.dir)
    try:
        source, converted = os.path.join(work, "hf"), os.path.join(work, "orbax")
        t = time.perf_counter()
        total, largest = write_source(source, args.layers, args.seed)
        generate_s = time.perf_counter() - t
        free = shutil.disk_usage(work).free
        if free < 1.2 * total:
            raise SystemExit(f"only {free / 1e9:.1f} GB free in {args.dir}")
        evict(source)
        load_before = os.getloadavg()[0]
        run = timed([sys.executable, "-m", "phi3_jax.cli", "convert", source, converted,
                     "--quiet"])
        checked = spot_check(source, converted)
        stored = sum(os.path.getsize(os.path.join(d, f))
                     for d, _, files in os.walk(converted) for f in files)
        bound = 3 * largest + GiB
        rows = [("source checkpoint", f"{total / 1e9:.2f} GB ({total / GiB:.2f} GiB), "
                                      f"{len(os.listdir(source)) - 1} files, bf16"),
                ("largest tensor", f"{largest / 1e6:.0f} MB"),
                ("peak RSS (convert)", f"{run['peak_rss'] / 1e9:.2f} GB"),
                ("bound 3 x largest + 1 GiB", f"{bound / 1e9:.2f} GB"),
                ("wall time (convert)", f"{run['wall_s']:.1f} s"),
                ("CPU time (user + sys)", f"{run['cpu_s']:.1f} s = "
                                          f"{run['cpu_s'] / run['wall_s']:.2f} cores busy"),
                ("load average (1 min)", f"{load_before:.1f} before, {run['load']:.1f} after"),
                ("throughput (wall)", f"{total / run['wall_s'] / 1e6:.0f} MB/s"),
                ("throughput (in-process)", f"{total / run['inner_s'] / 1e6:.0f} MB/s"
                 if run["inner_s"] else "n/a"),
                ("work per CPU-second", f"{total / run['cpu_s'] / 1e6:.0f} MB"),
                ("Orbax checkpoint size", f"{stored / 1e9:.2f} GB (zstd)")]
        result = {
            "bench": "convert", "layers": args.layers, "source_bytes": total,
            "largest_tensor_bytes": largest, "peak_rss_bytes": run["peak_rss"],
            "rss_bound_bytes": bound, "within_bound": run["peak_rss"] <= bound,
            "wall_s": round(run["wall_s"], 2), "inner_s": run["inner_s"],
            "cpu_s": round(run["cpu_s"], 1), "loadavg_1m_before": round(load_before, 2),
            "loadavg_1m_after": round(run["load"], 2),
            "mb_per_s": round(total / run["wall_s"] / 1e6, 1),
            "meets_150mb_s": total / run["wall_s"] / 1e6 >= 150,
            "orbax_bytes": stored, "generate_s": round(generate_s, 1),
            "tensors_spot_checked": checked,
        }
        if args.checksums:
            more, figures = checksum_costs(converted, run["inner_s"] or run["wall_s"])
            rows += more
            result.update(figures)
        if args.export:
            exported = os.path.join(work, "exported")
            evict(converted)
            out = timed([sys.executable, "-m", "phi3_jax.cli", "export", converted, exported,
                         "--quiet"])
            rows += [("peak RSS (export)", f"{out['peak_rss'] / 1e9:.2f} GB"),
                     ("wall time (export)", f"{out['wall_s']:.1f} s "
                                            f"({total / out['wall_s'] / 1e6:.0f} MB/s)")]
            result.update(export_peak_rss_bytes=out["peak_rss"],
                          export_cpu_s=round(out["cpu_s"], 1),
                          export_wall_s=round(out["wall_s"], 2))
        result.update(cpu=cpu_model(), cores=os.cpu_count(), python=platform.python_version(),
                      orbax_checkpoint=_version("orbax-checkpoint"),
                      tensorstore=_version("tensorstore"), jax=_version("jax"), commit=git_head())
    finally:
        shutil.rmtree(work, ignore_errors=True)

    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps(result))
    return 0 if result["within_bound"] and result["meets_150mb_s"] else 1


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    sys.exit(main())
