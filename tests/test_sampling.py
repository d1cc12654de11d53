"""The per-row logits processors against transformers' own, on identical fp32 logits.

Every row of a batch carries its own settings; each row must equal transformers' processor
chain built for that row's settings alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.generation import logits_process as hf

from phi3_jax import sampling
from phi3_jax.sampling import RowSampling

B, V, L = 4, 96, 12
# Both sides compute in fp32; the only differences are rounding in softmax/cumsum and in
# dividing by a scalar (torch may multiply by its reciprocal): a few ulps of O(10) scores.
TOL = dict(rtol=1e-6, atol=1e-6)
OFF = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def batch():
    rs = np.random.RandomState(0)
    # Scale 3 gives peaked distributions, so top-p and min-p cut at varied places.
    logits = (3.0 * rs.randn(B, V)).astype(np.float32)
    ids = rs.randint(0, V, (B, L))
    seen = np.zeros((B, V), bool)
    for b in range(B):
        seen[b, ids[b]] = True
    return logits, ids, seen


def rows(settings: list[dict]) -> RowSampling:
    """RowSampling with each row's settings (unset ones off)."""
    full = [{**OFF, **s} for s in settings]
    return RowSampling(
        temperature=jnp.asarray([s["temperature"] for s in full], jnp.float32),
        top_k=jnp.asarray([s["top_k"] for s in full], jnp.int32),
        top_p=jnp.asarray([s["top_p"] for s in full], jnp.float32),
        min_p=jnp.asarray([s["min_p"] for s in full], jnp.float32),
        repetition_penalty=jnp.asarray([s["repetition_penalty"] for s in full], jnp.float32))


def _hf_chain(settings: dict, ids: np.ndarray, logits: np.ndarray) -> torch.Tensor:
    """transformers' own processor list (its order and conditions) for one row's settings."""
    config = transformers.Phi3Config(vocab_size=V, hidden_size=16, intermediate_size=16,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = transformers.Phi3ForCausalLM(config)
    do_sample = settings.get("temperature", 0) > 0
    gen = dict(settings)
    if not do_sample:
        gen.pop("temperature", None)
    generation_config = transformers.GenerationConfig(do_sample=do_sample, **gen)
    processors = model._get_logits_processor(
        generation_config, input_ids_seq_length=L, device="cpu",
        model_kwargs={"attention_mask": torch.ones(1, L, dtype=torch.long)})
    return processors(torch.tensor(ids[None]), torch.tensor(logits[None]))[0]


def _same(ours, theirs):
    ours, theirs = np.asarray(ours), theirs.numpy()
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(theirs))
    finite = ~np.isneginf(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], **TOL)


CASES = [
    dict(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    dict(temperature=1.3, top_p=0.5, repetition_penalty=0.8),
    dict(temperature=0.5, min_p=0.2),
    dict(temperature=0, repetition_penalty=1.5),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_k=V + 10),
    dict(temperature=0.9, top_p=0.0),
    dict(temperature=1.1, top_p=0.999, top_k=40),
    dict(temperature=1.7),
    dict(temperature=0.3, min_p=1.0),
]


@pytest.mark.parametrize("order", [0, 1, 2])
def test_each_row_matches_transformers_for_its_own_settings(batch, order):
    """Four rows with four different settings in one call, rotated across calls: each row
    equals transformers' chain for its settings, whichever row it sits in."""
    logits, ids, seen = batch
    settings = [CASES[(order * B + b) % len(CASES)] for b in range(B)]
    ours = sampling.process(jnp.asarray(logits), jnp.asarray(seen), rows(settings))
    for b in range(B):
        _same(ours[b], _hf_chain(settings[b], ids[b], logits[b]))


def test_off_values_leave_the_scores_exactly():
    logits = jnp.asarray(np.random.RandomState(1).randn(3, V).astype(np.float32))
    seen = jnp.ones((3, V), bool)
    s = rows([dict(temperature=1.0), dict(temperature=1.0), {}])
    np.testing.assert_array_equal(np.asarray(sampling.process(logits, seen, s)), logits)


def test_top_k_keeps_ties():
    logits = np.array([[1.0, 3.0, 2.0, 3.0, 0.5]], np.float32)
    theirs = hf.TopKLogitsWarper(1)(torch.zeros(1, 1, dtype=torch.long), torch.tensor(logits))
    ours = sampling.process(jnp.asarray(logits), jnp.zeros((1, 5), bool),
                            rows([dict(temperature=1.0, top_k=1)]))
    _same(ours, theirs)


def test_greedy_rows_take_the_argmax_after_the_penalty(batch):
    logits, _, seen = batch
    settings = [dict(repetition_penalty=3.0), dict(temperature=1.0, top_k=3), {},
                dict(repetition_penalty=0.5)]
    s = rows(settings)
    keys = sampling.row_keys(jnp.zeros((B, 2), jnp.uint32), jnp.arange(B))
    chosen = np.asarray(sampling.choose(jnp.asarray(logits), jnp.asarray(seen), s, keys))
    penalised = np.asarray(sampling.process(jnp.asarray(logits), jnp.asarray(seen), s))
    for b in (0, 2, 3):
        assert chosen[b] == penalised[b].argmax()
    assert chosen[1] in np.argsort(-logits[1])[:3]


def test_draws_follow_the_row_key_not_the_row(batch):
    """A row's draw depends on its seed and position only: the same (seed, position) gives the
    same token in any row of any batch, and the draws do sample within the filter."""
    logits = batch[0]
    x = jnp.asarray(np.tile(logits[:1], (B, 1)))
    s = rows([dict(temperature=1.0, top_k=5)] * B)
    choose = jax.jit(sampling.choose)
    draws = []
    for position in range(48):
        seeds = jnp.asarray([[7, 0], [8, 0], [7, 0], [7, 1]], jnp.uint32)
        keys = sampling.row_keys(seeds, jnp.full((B,), position))
        draws.append(np.asarray(choose(x, jnp.zeros((B, V), bool), s, keys)))
    draws = np.stack(draws)  # [48, B]
    np.testing.assert_array_equal(draws[:, 0], draws[:, 2])  # same seed, other row
    assert (draws[:, 0] != draws[:, 1]).any() and (draws[:, 0] != draws[:, 3]).any()
    assert set(draws.ravel()) <= set(np.argsort(-logits[0])[:5])
    assert len(set(draws[:, 0])) > 1  # it does sample
    # Alone in a batch of one: the same draws.
    for position in (0, 17):
        key = sampling.row_keys(jnp.asarray([[7, 0]], jnp.uint32), jnp.asarray([position]))
        one = choose(x[:1], jnp.zeros((1, V), bool), rows([dict(temperature=1.0, top_k=5)]),
                     key)
        assert int(one[0]) == draws[position, 0]


def test_new_settings_reuse_the_compiled_function(batch):
    logits, _, seen = batch
    process = jax.jit(sampling.process)
    process(jnp.asarray(logits), jnp.asarray(seen), rows(CASES[:B]))
    size = process._cache_size()
    process(jnp.asarray(logits), jnp.asarray(seen), rows(CASES[B:2 * B]))
    assert process._cache_size() == size


def test_logprobs_are_the_raw_log_softmax(batch):
    logits, _, _ = batch
    tokens = jnp.asarray([3, 0, V - 1, 50])
    chosen, top_ids, top_lp = sampling.logprobs(jnp.asarray(logits), tokens, 5)
    ref = torch.log_softmax(torch.tensor(logits), dim=-1).numpy()
    np.testing.assert_allclose(np.asarray(chosen), ref[np.arange(B), np.asarray(tokens)],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(top_ids), np.argsort(-ref, axis=1)[:, :5])
    np.testing.assert_allclose(np.asarray(top_lp), -np.sort(-ref, axis=1)[:, :5], rtol=1e-6,
                               atol=1e-6)
