"""The fused-attention switch, on the CPU.

cuDNN itself needs a GPU (checked on the H100, benchmarks/RESULTS.md); here the same
jax.nn.dot_product_attention call runs with implementation="xla", so CI covers the selection,
the mask handed to the kernel, the GQA head order, the scale and the model's routing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx

from phi3_jax import attention
from phi3_jax.attention import (
    ATTENTION_ENV,
    attention_impl,
    attention_mask,
    dot_product_attention,
    fused_dot_product_attention,
    fused_mask,
)
from phi3_jax.cache import KVCache
from phi3_jax.config import Phi3Config
from phi3_jax.model import Phi3ForCausalLM


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(ATTENTION_ENV, raising=False)


def test_default_selection():
    # The fused path is opt-in until verified on a GPU: the default is XLA for every dtype.
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        assert attention_impl(dtype) == "xla"


def test_env_overrides(monkeypatch):
    monkeypatch.setenv(ATTENTION_ENV, "CUDNN")
    assert attention_impl(jnp.bfloat16) == "cudnn"
    assert attention_impl(jnp.float16) == "cudnn"
    assert attention_impl(jnp.float32) == "xla"  # no fp32 kernel: fp32 stays exact
    monkeypatch.setenv(ATTENTION_ENV, "xla")
    assert attention_impl(jnp.bfloat16) == "xla"
    monkeypatch.setenv(ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match=ATTENTION_ENV):
        attention_impl(jnp.bfloat16)


def test_fused_mask_is_attention_mask():
    # Row 0: two left-padding slots then positions 0..3; row 1: no padding. Window W = 3.
    pos = jnp.array([[-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]], jnp.int32)
    mask = attention_mask(pos, pos, 3)
    expected = np.zeros((2, 6, 6), bool)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                qp, kp = int(pos[b, i]), int(pos[b, j])
                expected[b, i, j] = kp >= 0 and qp - 3 < kp <= qp
    np.testing.assert_array_equal(mask, expected)
    assert not expected[0, :2].any() and expected[0, 5, 3:].all() and not expected[0, 5, 2]
    fused = fused_mask(mask)
    assert fused.shape == (2, 1, 6, 6) and fused.dtype == jnp.bool_
    np.testing.assert_array_equal(fused[:, 0], mask)


def _qkv(dtype, B=2, T=5, S=9, K=2, G=3, H=16, seed=0):
    rs = np.random.RandomState(seed)
    q = jnp.asarray(rs.normal(size=(B, T, K, G, H)), dtype)
    k = jnp.asarray(rs.normal(size=(B, S, K, H)), dtype)
    v = jnp.asarray(rs.normal(size=(B, S, K, H)), dtype)
    # A cache of S slots: row 0 left-padded by 2, row 1 full; the T new queries are the last
    # filled slots, the final slot still empty (-1). Window 4.
    k_pos = np.array([[-1, -1, 0, 1, 2, 3, 4, 5, -1], [0, 1, 2, 3, 4, 5, 6, 7, -1]], np.int32)
    q_pos = k_pos[:, 3:8]
    return q, k, v, attention_mask(jnp.asarray(q_pos), jnp.asarray(k_pos), 4)


def test_fused_call_matches_xla_path_fp32():
    q, k, v, mask = _qkv(jnp.float32)
    ref = dot_product_attention(q, k, v, mask)
    got = fused_dot_product_attention(q, k, v, mask, implementation="xla")
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # The comparison can see a head-order bug: pairing query head n with KV head n % K
    # instead of n // G (K=2, G=3 here) gives another answer.
    B, T, K, G, H = q.shape
    swapped = q.transpose(0, 1, 3, 2, 4).reshape(B, T, K, G, H)
    wrong = fused_dot_product_attention(swapped, k, v, mask, implementation="xla")
    assert np.abs(np.asarray(wrong) - np.asarray(dot_product_attention(swapped, k, v, mask))
                  ).max() < 1e-5
    assert np.abs(np.asarray(wrong) - np.asarray(ref)).max() > 1e-1


def test_fused_call_matches_xla_path_bf16():
    q, k, v, mask = _qkv(jnp.bfloat16)
    ref = np.asarray(dot_product_attention(q, k, v, mask), np.float32)
    got = np.asarray(fused_dot_product_attention(q, k, v, mask, implementation="xla"),
                     np.float32)
    # Both accumulate in fp32 and round probabilities and outputs to bf16 (8 bits): outputs are
    # convex combinations of |v| <= max|v|, so two roundings bound the gap.
    bound = 2 * 2.0 ** -8 * float(jnp.abs(v.astype(jnp.float32)).max())
    assert np.abs(got - ref).max() <= bound


def test_model_routes_prefill_only(monkeypatch):
    """With the switch on, prefill (T > 1) takes the fused call and decode does not."""
    calls = []

    def fake_fused(q, k, v, mask):
        calls.append(q.shape[1])
        return fused_dot_product_attention(q, k, v, mask, implementation="xla")

    config = Phi3Config.from_hf(dict(TINY, model_type="phi3", num_attention_heads=8,
                                     num_key_value_heads=2, sliding_window=4))
    model = Phi3ForCausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    rs = np.random.RandomState(1)
    tokens = jnp.asarray(rs.randint(3, 100, (2, 6)), jnp.int32)
    pos = jnp.array([[-1, -1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]], jnp.int32)

    def run():
        cache = KVCache.init(config, 2, 8, jnp.bfloat16)
        logits, cache = model(tokens, pos, cache)
        step, _ = model(tokens[:, -1:], pos[:, -1:] + 1, cache)
        return np.asarray(logits, np.float32), np.asarray(step, np.float32)

    ref = run()
    assert calls == []
    monkeypatch.setenv(ATTENTION_ENV, "cudnn")
    monkeypatch.setattr(attention, "fused_dot_product_attention", fake_fused)
    got = run()
    assert calls == [6] * config.num_hidden_layers
    valid = np.asarray(pos) >= 0
    # Same bf16 arithmetic in the same order: the logits agree to a few bf16 ulps of their size.
    tol = 4 * 2.0 ** -8 * np.abs(ref[0][valid]).max()
    assert np.abs(got[0][valid] - ref[0][valid]).max() <= tol
    assert np.abs(got[1] - ref[1]).max() <= tol
    assert jax.default_backend() == "cpu"
