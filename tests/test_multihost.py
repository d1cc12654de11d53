"""The same code under jax.distributed: 2 processes on this machine, 4 CPU devices each, one
data=2 x model=4 mesh over all 8, must give one process's greedy tokens and logits.

Each process runs tests/multihost_worker.py; the coordinator listens on a free localhost port
and gloo carries the cross-process collectives (JAX's default on CPU).
"""

from __future__ import annotations

import ast
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from conftest import make_hf_checkpoint
from multihost_worker import greedy, prompts_for

import phi3_jax

TESTS = pathlib.Path(__file__).parent
PROCESSES, LOCAL_DEVICES = 2, 4
TIMEOUT_S = 240
MESH = "data=2,model=4"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    # GQA with vocab and F split and K=4 split on model=4: every kind of collective is used.
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", seed=5, num_attention_heads=8,
                              num_key_value_heads=4, hidden_size=64)
    reference = phi3_jax.load(ckpt)
    prompts = prompts_for(reference.config.vocab_size)
    ref_tokens = greedy(reference, prompts, steps=6)
    ref_logits = np.asarray(reference.logits(prompts))

    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={LOCAL_DEVICES}",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(
        [sys.executable, str(TESTS / "multihost_worker.py"), str(ckpt), str(out), MESH,
         address, str(PROCESSES), str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(PROCESSES)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{_errors(logs[i])}"

    for i in range(PROCESSES):
        result = np.load(out / f"process_{i}.npz")
        assert (int(result["process_count"]), int(result["local_devices"]),
                int(result["global_devices"])) == (PROCESSES, LOCAL_DEVICES, 8)
        assert ast.literal_eval(str(result["tokens"])) == ref_tokens
        np.testing.assert_allclose(result["logits"], ref_logits, rtol=1e-5,
                                   atol=1e-5 * np.abs(ref_logits).max())
        # Each process holds only its own devices' slices of the weights.
        local = ast.literal_eval(str(result["local"]))
        embed = local["model.embed_tokens.weight"]
        assert embed == [(i, (128 // 4, 64))] * LOCAL_DEVICES
        qkv = local["model.layers.0.self_attn.qkv_proj.weight"]
        assert qkv == [(i, (64, 1, 2 + 2, 8))] * LOCAL_DEVICES  # K = 4 over model=4


def _errors(log: str) -> str:
    # gloo prints a line per connection; keep the rest.
    return "\n".join(line for line in log.splitlines() if "[Gloo]" not in line)[-4000:]
