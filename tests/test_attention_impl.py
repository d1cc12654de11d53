"""The fast attention paths against the plain XLA reference, on the CPU.

cuDNN itself needs a GPU (benchmarks/check_fused_attention.py, run on the H100 and recorded in
benchmarks/RESULTS.md); here the same jax.nn.dot_product_attention call runs with
implementation="xla", so CI covers the selection, the causal/length/window arguments handed to
the kernel, the GQA head order, the block-diagonal decode matmul and the model's routing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, longrope
from flax import nnx

from phi3_jax import attention
from phi3_jax.api import Phi3
from phi3_jax.attention import (
    Kernels,
    attention_mask,
    blocked_cached_attention,
    blocked_causal_attention,
    causal_attention,
    choose_kernels,
    decode_attention,
    dot_product_attention,
    prefill_block,
)
from phi3_jax.config import Phi3Config
from phi3_jax.model import Phi3ForCausalLM

BF16_ULP = 2.0 ** -8


def test_selection():
    assert jax.default_backend() == "cpu"
    # "auto" (the default) takes the fast paths on GPUs only.
    for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
        assert choose_kernels("auto", dtype) == Kernels("blocked", "einsum", False, "blocked")
    # Quantized weights: blocked tiles on one CPU; XLA's fused convert on a mesh or a GPU.
    assert choose_kernels("xla", jnp.float32, sharded=True).quantized_matmul == "xla"
    gpu = dict(backend="gpu")
    assert choose_kernels("auto", jnp.bfloat16, **gpu) == Kernels("cudnn", "matmul", True)
    assert choose_kernels("auto", jnp.float16, **gpu).prefill == "cudnn"
    # No fp32 kernel: fp32 takes the blocked prefill; the decode matmul still applies.
    assert choose_kernels("auto", jnp.float32, **gpu) == Kernels("blocked", "matmul", True)
    # KV heads split over a mesh axis: the einsum decode partitions with no communication.
    assert choose_kernels("auto", jnp.bfloat16, heads_split=True, **gpu).decode == "einsum"
    assert choose_kernels("xla", jnp.bfloat16, **gpu) == Kernels("xla", "einsum", False)
    assert choose_kernels("blocked", jnp.bfloat16, **gpu) == Kernels("blocked", "einsum", False)
    assert choose_kernels("cudnn", jnp.bfloat16, **gpu).prefill == "cudnn"
    with pytest.raises(ValueError, match="needs a GPU"):
        choose_kernels("cudnn", jnp.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        choose_kernels("cudnn", jnp.float32, **gpu)
    with pytest.raises(ValueError, match="attention must be one of"):
        choose_kernels("fast")


def test_load_carries_the_choice(hf_checkpoint):
    import phi3_jax

    path = hf_checkpoint()
    assert phi3_jax.load(path).kernels == Kernels("blocked", "einsum", False, "blocked")
    assert phi3_jax.load(path, attention="xla").kernels == Kernels("xla", "einsum", False,
                                                                   "blocked")
    with pytest.raises(ValueError, match="attention must be one of"):
        phi3_jax.load(path, attention="flash")


def test_attention_mask_by_hand():
    # Row 0: positions 0..3 then two padding slots (right padding); row 1: no padding. W = 3.
    pos = jnp.array([[0, 1, 2, 3, -1, -1], [0, 1, 2, 3, 4, 5]], jnp.int32)
    mask = np.asarray(attention_mask(pos, pos, 3))
    expected = np.zeros((2, 6, 6), bool)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                qp, kp = int(pos[b, i]), int(pos[b, j])
                expected[b, i, j] = kp >= 0 and qp - 3 < kp <= qp
    np.testing.assert_array_equal(mask, expected)
    assert not expected[0, 4:].any() and expected[0, 3, 1:4].all() and not expected[0, 3, 0]


def _prefill_qkv(dtype, lengths, T=12, K=2, G=3, H=16, seed=0):
    rs = np.random.RandomState(seed)
    B = len(lengths)
    q = jnp.asarray(rs.normal(size=(B, T, K, G, H)), dtype)
    k = jnp.asarray(rs.normal(size=(B, T, K, H)), dtype)
    v = jnp.asarray(rs.normal(size=(B, T, K, H)), dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    pos = jnp.where(jnp.arange(T)[None] < lengths[:, None], jnp.arange(T)[None], -1)
    return q, k, v, lengths, pos


@pytest.mark.parametrize("window", [None, 4, 12, 100])
def test_causal_attention_matches_reference(window):
    q, k, v, lengths, pos = _prefill_qkv(jnp.float32, [12, 7, 1, 0])
    ref = np.asarray(dot_product_attention(q, k, v, attention_mask(pos, pos, window)))
    got = np.asarray(causal_attention(q, k, v, lengths, window, implementation="xla"))
    valid = np.asarray(pos) >= 0
    np.testing.assert_allclose(got[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (got[~valid] == 0).all()  # padding queries are zeroed, never left to the kernel
    if window == 4:  # the window matters here, so the comparison can see a dropped window
        loose = np.asarray(causal_attention(q, k, v, lengths, None, implementation="xla"))
        assert np.abs(loose[valid] - ref[valid]).max() > 1e-2


def test_causal_attention_head_order():
    # Pairing query head n with KV head n % K instead of n // G (K=2, G=3) gives another answer.
    q, k, v, lengths, pos = _prefill_qkv(jnp.float32, [12, 9])
    B, T, K, G, H = q.shape
    swapped = q.transpose(0, 1, 3, 2, 4).reshape(B, T, K, G, H)
    ref = np.asarray(dot_product_attention(q, k, v, attention_mask(pos, pos, None)))
    wrong = np.asarray(causal_attention(swapped, k, v, lengths, None, implementation="xla"))
    assert np.abs(wrong - ref).max() > 1e-1


def test_causal_attention_bf16():
    q, k, v, lengths, pos = _prefill_qkv(jnp.bfloat16, [12, 5])
    ref = np.asarray(dot_product_attention(q, k, v, attention_mask(pos, pos, 4)), np.float32)
    got = np.asarray(causal_attention(q, k, v, lengths, 4, implementation="xla"), np.float32)
    valid = np.asarray(pos) >= 0
    # Both accumulate in fp32 and round probabilities and outputs to bf16 (8 bits): outputs are
    # convex combinations of |v| <= max|v|, so two roundings bound the gap.
    bound = 2 * BF16_ULP * float(jnp.abs(v.astype(jnp.float32)).max())
    assert np.abs(got[valid] - ref[valid]).max() <= bound


@pytest.mark.parametrize("window", [None, 4, 9, 100])
@pytest.mark.parametrize("T,block", [(12, 4), (13, 4), (12, 5), (12, 12)])
def test_blocked_causal_attention_matches_reference(window, T, block):
    """Key blocks with an online softmax, skipped above the diagonal, before the window and
    past the longest row; T not a multiple of the block; an empty row (length 0)."""
    q, k, v, lengths, pos = _prefill_qkv(jnp.float32, [T, 7, 1, 0], T=T)
    ref = np.asarray(dot_product_attention(q, k, v, attention_mask(pos, pos, window)))
    got = np.asarray(blocked_causal_attention(q, k, v, lengths, window, block))
    valid = np.asarray(pos) >= 0
    # fp32 throughout; the online softmax only reorders the sums (a few ulps of O(1) values).
    np.testing.assert_allclose(got[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert (got[~valid] == 0).all()
    if window == 4:
        loose = np.asarray(blocked_causal_attention(q, k, v, lengths, None, block))
        assert np.abs(loose[valid] - ref[valid]).max() > 1e-2


@pytest.mark.parametrize("window", [None, 4, 9])
@pytest.mark.parametrize("S,block", [(24, 4), (21, 4), (24, 5)])
def test_blocked_cached_attention_matches_reference(window, S, block):
    """A later prompt chunk over its row's cache: queries at positions start .. start + T - 1
    (different starts per row), keys at 0 .. S - 1; key blocks before the window and past the
    chunk skipped, S not a multiple of the block."""
    rs = np.random.RandomState(3)
    B, T, K, G, H = 2, 6, 2, 3, 8
    q = jnp.asarray(rs.normal(size=(B, T, K, G, H)), jnp.float32)
    k = jnp.asarray(rs.normal(size=(B, S, K, H)), jnp.float32)
    v = jnp.asarray(rs.normal(size=(B, S, K, H)), jnp.float32)
    starts = jnp.asarray([S - T, 7], jnp.int32)
    q_pos = starts[:, None] + jnp.arange(T)[None]
    k_pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    ref = np.asarray(dot_product_attention(q, k, v, attention_mask(q_pos, k_pos, window)))
    got = np.asarray(blocked_cached_attention(q, k, v, starts, window, block))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def _attention_grads(fn, q, k, v, pos, seed=1):
    """d(sum(w * out)) / d(q, k, v) for a random cotangent w on the valid queries only (the
    reference leaves padding queries' outputs unzeroed)."""
    w = jnp.asarray(np.random.RandomState(seed).normal(size=q.shape), jnp.float32)
    w = jnp.where((pos >= 0)[:, :, None, None, None], w, 0)
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(w * fn(q, k, v).astype(jnp.float32)),
                            argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("window", [None, 4, 9])
@pytest.mark.parametrize("T,block", [(12, 4), (13, 4), (12, 5)])
def test_blocked_causal_attention_gradients(window, T, block):
    """The custom VJP (flash attention's backward over the forward's blocks) against reverse
    mode through the reference: ragged rows, an empty row, windows, T not a multiple of the
    block, GQA (dK and dV summed over each KV head's G query heads)."""
    q, k, v, lengths, pos = _prefill_qkv(jnp.float32, [T, 7, 1, 0], T=T)
    mask = attention_mask(pos, pos, window)
    ref = _attention_grads(lambda q, k, v: dot_product_attention(q, k, v, mask), q, k, v, pos)
    got = _attention_grads(
        lambda q, k, v: blocked_causal_attention(q, k, v, lengths, window, block), q, k, v, pos)
    for name, g, r in zip("qkv", got, ref, strict=True):
        # fp32 both ways; the blocked sums only reorder the reference's (a few ulps of O(1)).
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5,
                                   err_msg=f"d{name}")
    assert float(jnp.abs(got[1]).max()) > 0.1  # the comparison is not between zeros
    if window == 4:  # a backward that ignored the window would differ
        loose = _attention_grads(
            lambda q, k, v: blocked_causal_attention(q, k, v, lengths, None, block), q, k, v, pos)
        assert max(float(jnp.abs(a - b).max()) for a, b in zip(loose, ref, strict=True)) > 1e-2


def test_blocked_causal_attention_gradients_bf16():
    """bf16 operands: the gradients stay within bf16 roundings of the fp32 reference's, as close
    as reverse mode through the bf16 reference gets (the fp32 reference is the truth for both)."""
    q32, k32, v32, lengths, pos = _prefill_qkv(jnp.float32, [12, 5], T=12)
    mask = attention_mask(pos, pos, 4)
    truth = _attention_grads(lambda q, k, v: dot_product_attention(q, k, v, mask),
                             q32, k32, v32, pos)
    q, k, v = (a.astype(jnp.bfloat16) for a in (q32, k32, v32))
    ref = _attention_grads(lambda q, k, v: dot_product_attention(q, k, v, mask), q, k, v, pos)
    got = _attention_grads(lambda q, k, v: blocked_causal_attention(q, k, v, lengths, 4, 4),
                           q, k, v, pos)
    for name, g, r, t in zip("qkv", got, ref, truth, strict=True):
        scale = float(jnp.abs(t).max())
        ref_err = float(jnp.abs(r.astype(jnp.float32) - t).max())
        err = float(jnp.abs(g.astype(jnp.float32) - t).max())
        # Same count of bf16 roundings on each path (operands, probabilities, dS, result): a
        # few ulps of the largest gradient, of the reference's own size.
        assert err <= max(2 * ref_err, 4 * BF16_ULP * scale), (name, err, ref_err, scale)


def test_prefill_block_choice(monkeypatch):
    """Two blocks at least: whole blocks from 2 * PREFILL_BLOCK tokens, half blocks from
    PREFILL_BLOCK, the reference below."""
    assert attention.PREFILL_BLOCK == 512
    assert [prefill_block(T) for T in (16, 511, 512, 1023, 1024, 114688)] == [
        None, None, 256, 256, 512, 512]
    monkeypatch.setattr(attention, "PREFILL_BLOCK", 8)
    assert [prefill_block(T) for T in (7, 8, 15, 16)] == [None, 4, 4, 8]


def test_blocked_causal_attention_bf16():
    q, k, v, lengths, pos = _prefill_qkv(jnp.bfloat16, [12, 5])
    ref = np.asarray(dot_product_attention(q, k, v, attention_mask(pos, pos, 4)), np.float32)
    got = np.asarray(blocked_causal_attention(q, k, v, lengths, 4, 4), np.float32)
    valid = np.asarray(pos) >= 0
    # Both round the (unnormalised here) probabilities and the output to bf16 once each, and
    # accumulate in fp32: the bound of test_causal_attention_bf16.
    bound = 2 * BF16_ULP * float(jnp.abs(v.astype(jnp.float32)).max())
    assert np.abs(got[valid] - ref[valid]).max() <= bound


def _decode_case(dtype, K, G, H=16, S=20, seed=0):
    """One query per row against a cache with every kind of slot: a right-padded prompt, empty
    slots between prompt and output, a finished row (query position -1), an unwritten tail."""
    rs = np.random.RandomState(seed)
    B = 3
    q = jnp.asarray(rs.normal(size=(B, 1, K, G, H)), dtype)
    k = jnp.asarray(rs.normal(size=(B, S, K, H)), dtype)
    v = jnp.asarray(rs.normal(size=(B, S, K, H)), dtype)
    k_pos = np.full((B, S), -1, np.int32)
    k_pos[0, :16] = np.arange(16)  # full prompt, generated tokens from slot 12 on
    k_pos[1, :5] = np.arange(5)  # short prompt: slots 5..11 empty, then generated tokens
    k_pos[1, 12:16] = np.arange(5, 9)
    k_pos[2, :9] = np.arange(9)
    q_pos = np.array([[15], [8], [-1]], np.int32)
    return q, k, v, jnp.asarray(q_pos), jnp.asarray(k_pos)


@pytest.mark.parametrize("K,G", [(4, 1), (2, 3)])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_matches_reference(K, G, window):
    q, k, v, q_pos, k_pos = _decode_case(jnp.float32, K, G)
    mask = attention_mask(q_pos, k_pos, window)
    ref = np.asarray(dot_product_attention(q, k, v, mask))
    got = np.asarray(jax.jit(decode_attention)(q, k, v, mask))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got[:2], ref[:2], rtol=1e-5, atol=1e-5)
    assert np.isfinite(got).all()  # the finished row (nothing visible) stays finite
    # The block diagonal is what makes it right: every head against KV head 0 differs.
    q0 = jnp.broadcast_to(q[:, :, :1], q.shape)
    assert np.abs(np.asarray(decode_attention(q0, k, v, mask)) - ref).max() > 1e-2


def test_decode_attention_bf16():
    q, k, v, q_pos, k_pos = _decode_case(jnp.bfloat16, 2, 3)
    mask = attention_mask(q_pos, k_pos, None)
    ref = np.asarray(dot_product_attention(q, k, v, mask), np.float32)[:2]
    got = np.asarray(decode_attention(q, k, v, mask), np.float32)[:2]
    bound = 2 * BF16_ULP * float(jnp.abs(v.astype(jnp.float32)).max())
    assert np.abs(got - ref).max() <= bound


@pytest.mark.parametrize("dtype,case", [("float32", "window"), ("bfloat16", "window"),
                                        ("float32", "longrope")])
def test_generate_fast_paths_match_reference(monkeypatch, dtype, case):
    """generate() with the fast paths gives the tokens of the reference paths, on a padded GQA
    batch with a sliding window, or with LongRoPE rows that cross original_max (the re-prefill
    gathers each row's slots into a padded sequence for the kernel), and the fast paths ran:
    the causal kernel in the prefill, decode_attention in the decode loop. The
    "kernel" is jax's XLA implementation of the same call, poisoned with NaN in the padding
    rows it is free to leave unspecified."""
    calls = {"kernel": 0, "decode": 0}
    real_kernel, real_decode = jax.nn.dot_product_attention, attention.decode_attention

    def poisoned_kernel(q, k, v, *args, query_seq_lengths=None, **kwargs):
        calls["kernel"] += 1
        kwargs["implementation"] = "xla"
        out = real_kernel(q, k, v, *args, query_seq_lengths=query_seq_lengths, **kwargs)
        pad = jnp.arange(q.shape[1])[None, :] >= query_seq_lengths[:, None]
        return jnp.where(pad[:, :, None, None], jnp.nan, out)

    def counted_decode(*args):
        calls["decode"] += 1
        return real_decode(*args)

    extra = (dict(sliding_window=6) if case == "window" else
             dict(longrope(8, 16), max_position_embeddings=64))  # 11 + 10 tokens cross 16
    config = Phi3Config.from_hf(dict(TINY, model_type="phi3", num_attention_heads=8,
                                     num_key_value_heads=2, **extra))
    module = Phi3ForCausalLM(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(3),
                             kernels=Kernels("xla", "einsum", False))
    graphdef, params = nnx.split(module)
    model = Phi3(config, graphdef, params, generation_config={})
    # The same weights with the GPU's choice: fp32 too, since the kernel's contract is
    # dtype-free and fp32 makes the comparison exact.
    fast_graphdef, _ = nnx.split(Phi3ForCausalLM(config, dtype=jnp.dtype(dtype),
                                                 rngs=nnx.Rngs(3),
                                                 kernels=Kernels("cudnn", "matmul", True)))
    fast = Phi3(config, fast_graphdef, params, generation_config={})
    rs = np.random.RandomState(2)
    prompts = [rs.randint(3, 100, n).tolist() for n in (11, 3, 7)]
    ref = [c.token_ids for c in model.generate(prompts, max_new_tokens=10, temperature=0.0)]
    # One row: the fast path also gives o_proj a second (zero) row there.
    [ref_one] = model.generate(prompts[0], max_new_tokens=10, temperature=0.0)
    assert calls == {"kernel": 0, "decode": 0}
    monkeypatch.setattr(jax.nn, "dot_product_attention", poisoned_kernel)
    monkeypatch.setattr(attention, "decode_attention", counted_decode)
    jax.clear_caches()  # the kernels are traced calls
    got = [c.token_ids for c in fast.generate(prompts, max_new_tokens=10, temperature=0.0)]
    [got_one] = fast.generate(prompts[0], max_new_tokens=10, temperature=0.0)
    jax.clear_caches()
    # One kernel trace per prefill program (the layers share one trace): a 16-token first
    # chunk for each of the two engines (four rows, one row), and with LongRoPE each engine's
    # 24-token chunk that re-prefills a crossing row (17 tokens).
    assert calls["kernel"] == (2 if case == "window" else 4)
    assert calls["decode"] >= 1
    if dtype == "float32":
        assert got == ref and got_one.token_ids == ref_one.token_ids
    else:  # bf16 reassociation can flip a near-tie; the first tokens must agree
        assert all(g[:2] == r[:2] for g, r in zip(got, ref, strict=True))


def test_layers_share_one_trace_keyed_by_the_kernels(monkeypatch):
    """A model call traces its decoder layer once, not once per layer, and that cached trace is
    keyed by the kernels: a model built with other kernels takes its own path, with no cache
    clearing, and each path's trace is reused, not repeated."""
    from phi3_jax.cache import CacheUpdate, KVCache
    from phi3_jax.model import DecoderLayer

    config = Phi3Config.from_hf(dict(TINY, model_type="phi3", num_hidden_layers=3,
                                     num_attention_heads=8, num_key_value_heads=2))
    reference = Phi3ForCausalLM(config, rngs=nnx.Rngs(0))
    fast = Phi3ForCausalLM(config, rngs=nnx.Rngs(0), kernels=Kernels("cudnn", "matmul", True))
    calls = {"layer": 0, "decode": 0}
    real_layer, real_decode = DecoderLayer.__call__, attention.decode_attention

    def counted_layer(*args, **kwargs):
        calls["layer"] += 1
        return real_layer(*args, **kwargs)

    def counted_decode(*args):
        calls["decode"] += 1
        return real_decode(*args)

    monkeypatch.setattr(DecoderLayer, "__call__", counted_layer)
    monkeypatch.setattr(attention, "decode_attention", counted_decode)
    jax.clear_caches()
    cache = KVCache.init(config, 2, 16, jnp.float32)
    tokens = jnp.array([[5], [7]], jnp.int32)
    positions = jnp.zeros((2, 1), jnp.int32)
    update = CacheUpdate(starts=positions[:, 0], read_len=16)

    def trace(model) -> None:  # a fresh outer function each time: only the layer's cache hits
        jax.eval_shape(lambda: model(tokens, positions, cache, update))

    trace(reference)
    assert calls == {"layer": 1, "decode": 0}  # 3 layers, one trace; the XLA reference path
    trace(fast)
    assert calls == {"layer": 2, "decode": 1}  # a new key: traced again, the matmul decode
    trace(reference)
    trace(fast)
    assert calls == {"layer": 2, "decode": 1}  # both traces reused
    jax.clear_caches()
