"""Smoke tests of the inference benchmarks (bench_gpu.py, profile_decode.py, prefill_memory.py,
bench_prefill_attention.py, bench_host.py, bench_engine.py): their --tiny CPU runs complete and
report sane rows, and bench_gpu's byte/FLOP accounting matches Phi-3-mini's parameter count.
The compilation and training benchmarks are in test_bench_smoke_compile_train.py (a file per
pytest-xdist worker's share)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402


def test_counts_match_phi3_mini():
    c = bench_gpu.counts(bench_gpu.MINI)
    # microsoft/Phi-3-mini-4k-instruct has 3,821,079,552 parameters (untied head).
    assert c["total"] == 3_821_079_552
    # K and V of 32 layers x 3072 wide, bf16: 384 KiB per token.
    assert c["kv_bytes_per_token"] == 2 * 2 * 32 * 3072
    # Minimal decode bytes: weights once, plus the filled KV of each row.
    need, read = bench_gpu.decode_bytes(c, 4, 100.0, 128)
    assert need == c["weight_bytes"] + 4 * 100 * c["kv_bytes_per_token"]
    assert read == c["weight_bytes"] + 4 * 128 * c["kv_bytes_per_token"]


def test_tiny_run_reports_every_case():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [r for r in result["rows"] if r["case"] != "init"]
    assert not [r for r in rows if "error" in r or "skipped" in r]
    cases = {(r["engine"], r["case"], r["batch"]) for r in rows}
    want = {(e, k, b) for k, b, _ in bench_gpu.TINY_JAX for e in ["phi3-jax"]}
    want |= {("transformers", k, b) for k, b, _ in bench_gpu.TINY_HF}
    assert cases == want
    for r in rows:
        if r["engine"] == "phi3-jax" and r["case"].startswith("decode"):
            # The while_loop ran every requested step: none stopped early on eos or length.
            assert r["steps"] == 2 + bench_gpu.CHUNKS * bench_gpu.STEPS
            assert r["ms"] > 0 and r["impl_bytes"] >= r["min_bytes"]
    generate = next(r for r in rows if r["case"] == "decode_generate")
    assert generate["cache_slots"] == 128  # generate()'s bucket for a 64 + 64 token budget


def test_profile_decode_tiny_run(tmp_path):
    """profile_decode.py's CPU run: every requested batch is decoded and traced, the trace is
    parsed (the CPU has no device kernels, so its table is empty), and the JSON line is written."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_decode.py"),
                           "--tiny", "--batch", "1", "2", "--no-gemv", "--prefill", "2", "32",
                           "--hlo", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["batch"] for r in result["decode"]] == [1, 2]
    assert "while" in (tmp_path / "decode_B2.hlo.txt").read_text()
    assert all(r["ms"] > 0 and r["threads"] for r in result["decode"])
    assert result["prefill"]["ms"] > 0
    assert (tmp_path / "decode_B2_ctx128.trace.json.gz").exists()
    assert (tmp_path / "profile_decode.json").exists()


def test_tiny_long_case():
    """--cases long: one prompt past original_max through generate()'s path, prefill then decode."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny",
                           "--cases", "long"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [r for r in json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
            if r["case"] == "long"]
    assert len(rows) == 1 and "error" not in rows[0]
    (row,) = rows
    assert row["prefill_ms"] > 0 and row["ms"] > 0
    assert row["prompt_bucket"] >= row["ctx"] and row["cache_slots"] >= row["prompt_bucket"]
    assert row["steps"] == 2 + bench_gpu.CHUNKS * bench_gpu.STEPS


def test_tiny_prefill_cases():
    """--cases prefill: batched prefills and time to first token, with and without the
    per-layer barrier."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny",
                           "--cases", "prefill"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"][1:]
    assert [r["case"] for r in rows] == ["prefill", "ttft", "ttft_no_barrier"]
    assert all(r["ms"] > 0 and "error" not in r for r in rows)


def test_prefill_memory_tiny_run(tmp_path):
    """prefill_memory.py's CPU run: compile-only memory of the prefill with and without the
    per-layer barrier, on abstract parameters; the barrier never costs memory."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill_memory.py"),
                           "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert rows and not [r for r in rows if "error" in r]
    by_case = {}
    for r in rows:
        by_case.setdefault((r["B"], r["T"]), {})[r["barrier"]] = r
    for case in by_case.values():
        assert case[True]["out_gib"] == case[False]["out_gib"] > 0
        assert case[True]["temp_gib"] <= case[False]["temp_gib"]
    assert (tmp_path / "prefill_memory.json").exists()


def test_bench_prefill_attention_tiny_run():
    """bench_prefill_attention.py --tiny: the blocked form agrees with the reference and needs
    fewer temporaries; every case reports a time."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" /
                                               "bench_prefill_attention.py"), "--tiny"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    for T in {r["T"] for r in rows}:
        ref, *blocked = [r for r in rows if r["T"] == T]
        assert ref["impl"] == "reference" and len(blocked) == 2
        for r in blocked:
            assert r["ms"] > 0 and r["max_abs_diff"] < 1e-5
            assert r["temp_mib"] < ref["temp_mib"]


def test_bench_host_tiny_run():
    """bench_host.py --tiny: every public call is timed."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_host.py"), "--tiny"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])["rows"]
    assert len(rows) == 3 and all(r["ms"] > 0 for r in rows)


def test_bench_engine_occupancy_and_tiny_run(hf_checkpoint, tmp_path):
    """bench_engine.py: its cache occupancy matches a case counted by hand (a row that has
    finished holds no live tokens, in static batching too), and --tiny runs the three engines
    over the whole workload."""
    import argparse

    import bench_engine

    # Two rows of 23 slots (prompt + output of the longer request). Prompts of 20 and 12 tokens
    # are prefilled in the first iteration, which draws each one's first token; then one decode
    # call: row 0 feeds positions 20, 21 (holding 21, 22 tokens), row 1 positions 12..15
    # (13..16 tokens). Steps: 21 + 13, 22 + 14, 15, 16 tokens of 46.
    work = [dict(prompt=list(range(3, 23)), new=3, arrival=0.0),
            dict(prompt=list(range(3, 15)), new=5, arrival=0.0)]
    args = argparse.Namespace(checkpoint=str(hf_checkpoint(eos_token_id=None)), slots=2,
                              prefill_chunk=16, decode_steps=8, buckets_per_octave=1,
                              compilation_cache=str(tmp_path / "jax-cache"))
    for static in (True, False):
        row = bench_engine.run_phi3_jax(args, work, static=static)
        assert row["max_len"] == 23 and row["decode_steps"] == 4 and row["tokens"] == 8
        assert abs(row["occupancy"] - (34 + 36 + 15 + 16) / 4 / 46) < 1e-12

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--tiny"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["engine"] for r in result["rows"]] == ["engine", "static", "transformers"]
    for r in result["rows"]:
        assert r["tokens"] == result["output_tokens"] and r["tok_s"] > 0
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        assert (r["occupancy"] is None) == (r["engine"] == "transformers")
        if r["occupancy"] is not None:
            assert 0 < r["occupancy"] <= 1
