"""The logits processors against transformers' own, on identical fp32 logits (torch tensors)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as hf

from phi3_jax.sampling import (
    MinP,
    RepetitionPenalty,
    Sampler,
    Temperature,
    TopK,
    TopP,
    make_sampler,
)

B, V, L = 4, 96, 12
# Both sides compute in fp32; the only differences are rounding in softmax/cumsum and in
# dividing by a scalar (torch may multiply by its reciprocal): a few ulps of O(10) scores.
TOL = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def batch():
    rs = np.random.RandomState(0)
    # Scale 3 gives peaked distributions, so top-p and min-p cut at varied places.
    logits = (3.0 * rs.randn(B, V)).astype(np.float32)
    ids = rs.randint(0, V, (B, L))
    pad = np.array([0, 3, 7, 0])  # left padding per row (ignored by the penalty, as in HF)
    mask = (np.arange(L)[None] >= pad[:, None]).astype(np.int64)
    ids[mask == 0] = 0  # padding id 0, which must not count as seen in rows that padded
    seen = np.zeros((B, V), bool)
    for b in range(B):
        seen[b, ids[b, pad[b]:]] = True
    return logits, ids, mask, seen


def _same(ours, theirs):
    ours, theirs = np.asarray(ours), theirs.numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = ~np.isneginf(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], **TOL)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty(batch, penalty):
    logits, ids, mask, seen = batch
    # Padding must not count as seen: run the reference on each row's unpadded ids alone (what
    # transformers >= 5.23's generate does with prompt_ignore_length; older releases lack it).
    proc = hf.RepetitionPenaltyLogitsProcessor(penalty)
    pad = mask.argmax(1)
    theirs = torch.cat([proc(torch.tensor(ids[b:b + 1, pad[b]:]), torch.tensor(logits[b:b + 1]))
                        for b in range(len(ids))])
    ours = RepetitionPenalty(penalty)(jnp.asarray(logits), jnp.asarray(seen))
    _same(ours, theirs)
    assert not np.allclose(np.asarray(ours), logits)  # the penalty did something


@pytest.mark.parametrize("t", [0.3, 1.7])
def test_temperature(batch, t):
    logits, ids, _, seen = batch
    theirs = hf.TemperatureLogitsWarper(t)(torch.tensor(ids), torch.tensor(logits))
    _same(Temperature(t)(jnp.asarray(logits), jnp.asarray(seen)), theirs)


@pytest.mark.parametrize("k", [1, 5, 40, V + 10])
def test_top_k(batch, k):
    logits, ids, _, seen = batch
    theirs = hf.TopKLogitsWarper(k)(torch.tensor(ids), torch.tensor(logits))
    ours = TopK(k)(jnp.asarray(logits), jnp.asarray(seen))
    _same(ours, theirs)
    assert (np.isfinite(np.asarray(ours)).sum(1) == min(k, V)).all()


def test_top_k_keeps_ties():
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 0.5]], np.float32)
    theirs = hf.TopKLogitsWarper(1)(torch.zeros(1, 1, dtype=torch.long), torch.tensor(logits))
    _same(TopK(1)(jnp.asarray(logits), jnp.zeros((1, 5), bool)), theirs)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.9, 0.999])
def test_top_p(batch, p):
    logits, ids, _, seen = batch
    theirs = hf.TopPLogitsWarper(p)(torch.tensor(ids), torch.tensor(logits))
    ours = TopP(p)(jnp.asarray(logits), jnp.asarray(seen))
    _same(ours, theirs)
    kept = np.isfinite(np.asarray(ours)).sum(1)
    assert kept.min() >= 1 and (p == 0.0 or kept.max() > 1)


def test_top_p_after_top_k(batch):
    """-inf entries from top-k must not shift top-p's cumulative sums."""
    logits, ids, _, _ = batch
    x = torch.tensor(logits)
    theirs = hf.TopPLogitsWarper(0.8)(torch.tensor(ids), hf.TopKLogitsWarper(10)(None, x))
    ours = TopP(0.8)(TopK(10)(jnp.asarray(logits), None), None)
    _same(ours, theirs)


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 1.0])
def test_min_p(batch, p):
    logits, ids, _, seen = batch
    theirs = hf.MinPLogitsWarper(p)(torch.tensor(ids), torch.tensor(logits))
    _same(MinP(p)(jnp.asarray(logits), jnp.asarray(seen)), theirs)


def _hf_processors(settings: dict, mask: np.ndarray):
    """transformers' own processor list (its order and conditions) for these settings."""
    config = transformers.Phi3Config(vocab_size=V, hidden_size=16, intermediate_size=16,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.Phi3ForCausalLM(config)
    do_sample = settings.get("temperature", 0) > 0
    gen = dict(settings)
    if not do_sample:
        gen.pop("temperature", None)
    generation_config = transformers.GenerationConfig(do_sample=do_sample, **gen)
    return model._get_logits_processor(
        generation_config, input_ids_seq_length=L, device="cpu",
        model_kwargs={"attention_mask": torch.tensor(mask)})


@pytest.mark.parametrize("settings", [
    dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    dict(temperature=1.3, top_p=0.5, repetition_penalty=0.8),
    dict(temperature=0.5, min_p=0.2),
    dict(temperature=0, repetition_penalty=1.5),
])
def test_chain_matches_transformers_order(batch, settings):
    logits, ids, mask, seen = batch
    theirs = _hf_processors(settings, mask)(torch.tensor(ids), torch.tensor(logits))
    ours = make_sampler(**settings).process(jnp.asarray(logits), jnp.asarray(seen))
    _same(ours, theirs)


def test_greedy_is_argmax_after_penalty(batch):
    logits, _, _, seen = batch
    sampler = make_sampler(temperature=0, repetition_penalty=3.0)
    chosen = np.asarray(sampler(jnp.asarray(logits), jnp.asarray(seen), jax.random.key(0)))
    penalised = np.asarray(RepetitionPenalty(3.0)(jnp.asarray(logits), jnp.asarray(seen)))
    np.testing.assert_array_equal(chosen, penalised.argmax(1))
    assert sampler.greedy and make_sampler().processors == ()


def test_sampling_reproducible_and_within_filter(batch):
    logits, _, _, seen = batch
    sampler = jax.jit(make_sampler(temperature=1.0, top_k=3).__call__)
    x, s = jnp.asarray(logits), jnp.asarray(seen)
    draws = np.stack([np.asarray(sampler(x, s, jax.random.key(i))) for i in range(64)])
    again = np.stack([np.asarray(sampler(x, s, jax.random.key(i))) for i in range(64)])
    np.testing.assert_array_equal(draws, again)
    top3 = np.argsort(-logits, axis=1)[:, :3]
    for b in range(B):
        assert set(draws[:, b]) <= set(top3[b])
        assert len(set(draws[:, b])) > 1  # it does sample


def test_numbers_are_traced_structure_is_static():
    """A new temperature or top-k reuses the compiled function; another processor set does not."""
    a, b = make_sampler(0.5, top_k=4), make_sampler(0.9, top_k=7)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    assert jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(make_sampler(0.5))
    assert isinstance(a, Sampler)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=0, top_k=5), "top_k only apply when sampling"),
    (dict(temperature=0, top_p=0.9), "top_p"),
    (dict(temperature=1.0, top_k=-2), "top_k"),
    (dict(temperature=1.0, top_k=2.5), "top_k"),
    (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sampler(**kwargs)
