"""Smoke tests of the compilation and training benchmarks (bench_compile.py, bench_train.py):
their --tiny CPU runs complete and report what they measure. Kept apart from
test_bench_smoke.py so that pytest-xdist can give the two files to different workers."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_compile  # noqa: E402


def test_bench_compile_tiny_run():
    """bench_compile.py --tiny: the cold pass builds programs, the same process then builds
    none, and a fresh process loads every program from the persistent cache."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compile.py"),
                           "--tiny"], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    cold, steady, warm, cold_w, warm_w = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert cold["programs"] > 0 and cold["from_cache"] == 0
    assert steady["programs"] == 0
    assert warm["programs"] == warm["from_cache"] == cold["programs"]
    # A server's engine: warmup() builds every program it can run, then the requests build
    # none; all compiled on an empty cache, all loaded from it in the next process.
    assert cold_w["programs"] > 0 and cold_w["from_cache"] == 0
    assert cold_w["request_programs"] == warm_w["request_programs"] == 0
    assert warm_w["programs"] == warm_w["from_cache"] == cold_w["programs"]
    assert 0 < cold_w["warmup_s"] < cold_w["wall_s"] and cold["warmup_s"] is None
    # A warm start still traces and lowers every program (the cache key hashes the module);
    # the same process again finds them all in jax's in-memory caches.
    assert warm["trace_s"] > 0 and warm["lower_s"] > 0 and steady["lower_s"] == 0


def test_bench_compile_trace_only_tiny_run():
    """bench_compile.py --trace-only: every program of the workload traced and lowered, at its
    real shapes on abstract parameters, with nothing compiled."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compile.py"),
                           "--tiny", "--trace-only", "--repeats", "1"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert [r["program"] for r in rows] == ["prefill", "decode"] * len(bench_compile.TINY_WORKLOAD)
    assert all(r["trace_s"] > 0 and r["lower_s"] > 0 for r in rows)


def test_bench_train_attention_both_tiny_run():
    """bench_train.py --attention both: at 1024 tokens the kernels run (the blocked attention
    and its flash backward here) gives the reference's loss with less scratch memory."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--config", "tiny",
         "--modes", "full", "--batch", "1", "--seq", "1024", "--dtype", "float32", "--steps",
         "1", "--warmup", "1", "--peak-tflops", "1", "--attention", "both"],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    kernels, reference = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert (kernels["attention"], reference["attention"]) == ("kernels", "reference")
    assert kernels["loss_impl"] == reference["loss_impl"] == "chunked"
    assert abs(kernels["loss"] - reference["loss"]) <= 1e-5 * abs(reference["loss"])
    assert kernels["temp_gib"] < reference["temp_gib"]


def test_bench_train_compile_only_tiny_run():
    """bench_train.py --compile-only --loss both: the step compiled on abstract state with each
    loss, scratch memory reported, nothing run."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--config", "tiny",
         "--modes", "full,lora", "--batch", "2", "--seq", "64", "--loss", "both",
         "--compile-only"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    assert [(r["mode"], r["loss_impl"]) for r in rows] == [
        ("full", "chunked"), ("full", "full"), ("lora", "chunked"), ("lora", "full")]
    assert all(r["temp_gib"] > 0 and "step_ms" not in r for r in rows)
