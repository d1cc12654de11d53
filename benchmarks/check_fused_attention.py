"""GPU check: the fast attention paths against the plain XLA path.

1. Prefill kernel: causal_attention through cuDNN vs dot_product_attention on bf16 q/k/v with GQA
   (K=2, G=3, H=96), right padding (one empty row) and a sliding window.
2. Decode: decode_attention (block-diagonal matmuls) vs dot_product_attention for one query per
   row against a cache with padding, empty slots and a window, in bf16 and fp32.
3. Gradients (training declares right-padded rows, so it takes these kernels too): causal_attention
   through cuDNN and blocked_causal_attention's flash backward, both bf16, against reverse mode
   through the fp32 reference; each must stay within bf16 roundings, as close as reverse mode
   through the bf16 reference gets. Padding rows of the bf16 gradients must be finite.
4. Model: a small random Phi-3 (GQA, sliding window 16): each prompt's last-position logits
   (model.logits, the prefill path) and greedy tokens of a batch through generate() (the
   engine), with attention="auto" (fast) vs "xla". bf16 logits must
   agree within a bf16 bound; the fp32 model (fast decode, blocked prefill) must give identical
   tokens.
Prints a table and a final JSON line; exits 1 when a check fails. Needs a GPU.
"""

from __future__ import annotations

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
    attention_mask,
    blocked_causal_attention,
    causal_attention,
    choose_kernels,
    decode_attention,
    dot_product_attention,
)
from phi3_jax.config import Phi3Config
from phi3_jax.model import Phi3ForCausalLM

BF16_ULP = 2.0 ** -8


def prefill_kernel_check() -> dict:
    rs = np.random.RandomState(0)
    B, T, K, G, H, W = 4, 256, 2, 3, 96, 40
    q = jnp.asarray(rs.normal(size=(B, T, K, G, H)), jnp.bfloat16)
    k = jnp.asarray(rs.normal(size=(B, T, K, H)), jnp.bfloat16)
    v = jnp.asarray(rs.normal(size=(B, T, K, H)), jnp.bfloat16)
    lengths = jnp.asarray([256, 200, 37, 0], jnp.int32)
    pos = jnp.where(jnp.arange(T)[None] < lengths[:, None], jnp.arange(T)[None], -1)
    ref = np.asarray(jax.jit(dot_product_attention)(q, k, v, attention_mask(pos, pos, W)),
                     np.float32)
    fused = jax.jit(causal_attention, static_argnums=(4,))
    got = np.asarray(fused(q, k, v, lengths, W), np.float32)
    hlo = fused.lower(q, k, v, lengths, W).as_text()
    valid = np.asarray(pos) >= 0
    diff = float(np.abs(got - ref)[valid].max())
    bound = 2 * BF16_ULP * float(jnp.abs(v.astype(jnp.float32)).max())
    return {"check": "prefill kernel bf16", "max_abs_diff": diff, "bound": bound,
            "padding_zero": bool((got[~valid] == 0).all()), "cudnn_custom_call": "cudnn" in hlo,
            "ok": diff <= bound and bool((got[~valid] == 0).all()) and "cudnn" in hlo}


def gradient_checks() -> list[dict]:
    rs = np.random.RandomState(2)
    B, T, K, G, H, W = 3, 256, 2, 3, 96, 40
    q32, k32, v32 = (jnp.asarray(rs.normal(size=(B, T, K, *g, H)), jnp.float32)
                     for g in ((G,), (), ()))
    lengths = jnp.asarray([256, 130, 0], jnp.int32)
    pos = jnp.where(jnp.arange(T)[None] < lengths[:, None], jnp.arange(T)[None], -1)
    valid = (pos >= 0)[:, :, None, None, None]
    w = jnp.where(valid, jnp.asarray(rs.normal(size=q32.shape), jnp.float32), 0)
    mask = attention_mask(pos, pos, W)

    def grads(fn, *qkv):
        return jax.jit(jax.grad(lambda *a: jnp.sum(w * fn(*a).astype(jnp.float32)),
                                argnums=(0, 1, 2)))(*qkv)

    with jax.default_matmul_precision("highest"):
        truth = grads(lambda q, k, v: dot_product_attention(q, k, v, mask), q32, k32, v32)
    bf16 = [a.astype(jnp.bfloat16) for a in (q32, k32, v32)]
    ref = grads(lambda q, k, v: dot_product_attention(q, k, v, mask), *bf16)
    rows = []
    for name, fn in (("cudnn", lambda q, k, v: causal_attention(q, k, v, lengths, W)),
                     ("blocked", lambda q, k, v: blocked_causal_attention(q, k, v, lengths, W,
                                                                          64))):
        got = grads(fn, *bf16)
        errs, bounds = [], []
        for g, r, t in zip(got, ref, truth, strict=True):
            errs.append(float(jnp.abs(g.astype(jnp.float32) - t).max()))
            bounds.append(max(2 * float(jnp.abs(r.astype(jnp.float32) - t).max()),
                              4 * BF16_ULP * float(jnp.abs(t).max())))
        finite = all(bool(jnp.isfinite(g.astype(jnp.float32)).all()) for g in got)
        rows.append({"check": f"prefill gradients bf16 {name}", "max_abs_diff": max(errs),
                     "worst_ratio_to_bound": max(e / b for e, b in zip(errs, bounds,
                                                                       strict=True)),
                     "finite": finite,
                     "ok": finite and all(e <= b for e, b in zip(errs, bounds, strict=True))})
    return rows


def decode_checks() -> list[dict]:
    rows = []
    rs = np.random.RandomState(1)
    B, S, K, G, H, W = 8, 1024, 4, 3, 96, 300
    k_pos = np.full((B, S), -1, np.int32)
    q_pos = np.zeros((B, 1), np.int32)
    for b in range(B):  # prompt of n tokens, empty slots up to 512, then m generated tokens
        n, m = rs.randint(1, 512), rs.randint(1, 400)
        k_pos[b, :n] = np.arange(n)
        k_pos[b, 512:512 + m] = np.arange(n, n + m)
        q_pos[b, 0] = n + m - 1
    mask = attention_mask(jnp.asarray(q_pos), jnp.asarray(k_pos), W)
    for dtype in (jnp.bfloat16, jnp.float32):
        q = jnp.asarray(rs.normal(size=(B, 1, K, G, H)), dtype)
        k = jnp.asarray(rs.normal(size=(B, S, K, H)), dtype)
        v = jnp.asarray(rs.normal(size=(B, S, K, H)), dtype)
        with jax.default_matmul_precision("highest"):
            ref = np.asarray(jax.jit(dot_product_attention)(q, k, v, mask), np.float32)
            got = np.asarray(jax.jit(decode_attention)(q, k, v, mask), np.float32)
        diff = float(np.abs(got - ref).max())
        vmax = float(jnp.abs(v.astype(jnp.float32)).max())
        bound = 2 * BF16_ULP * vmax if dtype == jnp.bfloat16 else 1e-5 * vmax
        rows.append({"check": f"decode {jnp.dtype(dtype).name}", "max_abs_diff": diff,
                     "bound": bound, "ok": diff <= bound})
    return rows


def model_checks() -> list[dict]:
    raw = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
               sliding_window=16, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               model_type="phi3", initializer_range=0.2)
    config = Phi3Config.from_hf(raw)
    rs = np.random.RandomState(1)
    prompts = [rs.randint(3, 500, n).tolist() for n in (48, 41, 20, 33)]
    rows = []
    for dtype in (jnp.bfloat16, jnp.float32):
        out = {}
        for impl in ("xla", "fast"):
            kernels = choose_kernels("auto" if impl == "fast" else "xla", dtype)
            module = Phi3ForCausalLM(config, dtype=dtype, rngs=nnx.Rngs(0), kernels=kernels)
            graphdef, params = nnx.split(module)
            model = Phi3(config, graphdef, params, generation_config={})
            with jax.default_matmul_precision("highest" if dtype == jnp.float32 else None):
                # Each prompt's last-position logits, through the prefill path.
                logits = np.stack([np.asarray(model.logits([p]), np.float32)[0, -1]
                                   for p in prompts])
                tokens = [c.token_ids for c in model.generate(prompts, max_new_tokens=24,
                                                              temperature=0.0)]
                # One row alone too: its decode gives o_proj a second row on the fast path.
                tokens += [model.generate(prompts[0], max_new_tokens=24,
                                          temperature=0.0)[0].token_ids]
            out[impl] = (logits, tokens, kernels.prefill)
        (lx, tx, _), (lf, tf, pf) = out["xla"], out["fast"]
        diff = float(np.abs(lf - lx).max())
        scale = float(np.abs(lx).max())
        same = sum(a == b for a, b in zip(tx, tf, strict=True))
        name = jnp.dtype(dtype).name
        if dtype == jnp.float32:
            bound = 1e-4 * scale
            ok = pf == "blocked" and diff <= bound and same == len(tx)
        else:
            bound = 4 * BF16_ULP * scale
            ok = pf == "cudnn" and diff <= bound
        rows.append({"check": f"model {name}", "prefill_under_fast": pf,
                     "max_abs_logit_diff": diff, "logit_scale": scale, "bound": bound,
                     "greedy_rows_identical": f"{same}/{len(tx)}", "ok": bool(ok)})
    return rows


def main() -> int:
    rows = [prefill_kernel_check(), *gradient_checks(), *decode_checks(), *model_checks()]
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in r.items()))
    ok = all(r["ok"] for r in rows)
    print(json.dumps({"bench": "check_fused_attention", "ok": ok, "rows": rows,
                      "device": jax.devices()[0].device_kind, "jax": jax.__version__}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
