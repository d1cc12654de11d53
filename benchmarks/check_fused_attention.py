"""GPU check: the cuDNN fused prefill attention against the plain XLA path.

1. Kernel: fused_dot_product_attention (cuDNN) vs dot_product_attention on bf16 q/k/v with GQA
   (K=2, G=3, H=96), left padding, a sliding window and a partly empty cache (S > T).
2. Model: a small random bf16 Phi-3 (GQA, sliding window 16) on a left-padded batch: logits with
   PHI3_JAX_ATTENTION=cudnn vs =xla, and greedy generate() tokens both ways; an fp32 model (always
   the XLA path) must give identical tokens under either setting.
Prints a table and a final JSON line; exits 1 when a check fails. Needs a GPU.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
from flax import nnx

from phi3_jax.api import Phi3
from phi3_jax.attention import (
    ATTENTION_ENV,
    attention_impl,
    attention_mask,
    dot_product_attention,
    fused_dot_product_attention,
)
from phi3_jax.config import Phi3Config
from phi3_jax.model import Phi3ForCausalLM

BF16_ULP = 2.0 ** -8


def kernel_check() -> dict:
    rs = np.random.RandomState(0)
    B, T, S, K, G, H, W = 3, 128, 160, 2, 3, 96, 40
    q = jnp.asarray(rs.normal(size=(B, T, K, G, H)), jnp.bfloat16)
    k = jnp.asarray(rs.normal(size=(B, S, K, H)), jnp.bfloat16)
    v = jnp.asarray(rs.normal(size=(B, S, K, H)), jnp.bfloat16)
    pads = np.array([0, 7, 50])
    k_pos = np.full((B, S), -1, np.int32)  # last S - T slots stay empty
    for b, p in enumerate(pads):
        k_pos[b, p:T] = np.arange(T - p)
    q_pos = jnp.asarray(k_pos[:, :T])
    mask = attention_mask(q_pos, jnp.asarray(k_pos), W)
    ref = np.asarray(jax.jit(dot_product_attention)(q, k, v, mask), np.float32)
    got = np.asarray(jax.jit(fused_dot_product_attention)(q, k, v, mask), np.float32)
    hlo = jax.jit(fused_dot_product_attention).lower(q, k, v, mask).as_text()
    valid = k_pos[:, :T] >= 0
    diff = float(np.abs(got - ref)[valid].max())
    bound = 2 * BF16_ULP * float(jnp.abs(v.astype(jnp.float32)).max())
    return {"check": "kernel", "max_abs_diff": diff, "bound": bound, "ok": diff <= bound,
            "cudnn_custom_call": "cudnn$fmha" in hlo, "finite": bool(np.isfinite(got).all())}


def _logits(graphdef, params, tokens, positions):
    logits, _ = nnx.merge(graphdef, params)(tokens, positions)
    return logits.astype(jnp.float32)


def model_checks() -> list[dict]:
    raw = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
               sliding_window=16, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               model_type="phi3", initializer_range=0.2)
    config = Phi3Config.from_hf(raw)
    rs = np.random.RandomState(1)
    lengths = [48, 41, 20, 33]
    prompts = [rs.randint(3, 500, n).tolist() for n in lengths]
    T = max(lengths)
    tokens = np.zeros((len(prompts), T), np.int32)
    positions = np.full((len(prompts), T), -1, np.int32)
    for b, p in enumerate(prompts):
        tokens[b, T - len(p):] = p
        positions[b, T - len(p):] = np.arange(len(p))
    rows = []
    for dtype in (jnp.bfloat16, jnp.float32):
        module = Phi3ForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(module)
        model = Phi3(config, graphdef, params, generation_config={})
        out = {}
        for impl in ("xla", "cudnn"):
            os.environ[ATTENTION_ENV] = impl
            jax.clear_caches()  # the switch is read at trace time

            logits = np.asarray(jax.jit(functools.partial(_logits, graphdef))(
                params, tokens, positions))
            gen = model.generate(prompts, max_new_tokens=24, temperature=0.0)
            out[impl] = (logits, [c.token_ids for c in gen], attention_impl(dtype))
        valid = positions >= 0
        (lx, tx, ix), (lc, tc, ic) = out["xla"], out["cudnn"]
        diff = float(np.abs(lc - lx)[valid].max())
        scale = float(np.abs(lx[valid]).max())
        agree = float((lc.argmax(-1) == lx.argmax(-1))[valid].mean())
        same = sum(a == b for a, b in zip(tx, tc, strict=True))
        name = jnp.dtype(dtype).name
        if dtype == jnp.float32:
            ok = ix == ic == "xla" and diff == 0.0 and same == len(prompts)
        else:
            ok = ic == "cudnn" and diff <= 4 * BF16_ULP * scale and agree >= 0.99
        rows.append({"check": f"model {name}", "impl_under_cudnn_env": ic,
                     "max_abs_logit_diff": diff, "logit_scale": scale,
                     "bound": 4 * BF16_ULP * scale if dtype != jnp.float32 else 0.0,
                     "argmax_agree": agree, "greedy_rows_identical": f"{same}/{len(prompts)}",
                     "ok": bool(ok)})
    os.environ.pop(ATTENTION_ENV, None)
    return rows


def main() -> int:
    rows = [kernel_check(), *model_checks()]
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in r.items()))
    ok = all(r["ok"] for r in rows) and rows[0]["cudnn_custom_call"]
    print(json.dumps({"bench": "check_fused_attention", "ok": ok, "rows": rows,
                      "device": jax.devices()[0].device_kind, "jax": jax.__version__}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
