"""Generation against transformers' `generate` (greedy, fp32, tiny random models), and the
generator's own guarantees: cache vs full forward, batch invariance, stopping, compilation."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
from conftest import ORIGINAL_MAX, make_hf_checkpoint

import phi3_jax
from phi3_jax.api import Phi3
from phi3_jax.engine import programs
from phi3_jax.model import abstract_model

NEW = 24  # max_new_tokens everywhere, so the compiled programs are shared between tests


def _prompt(length: int, seed: int, vocab: int = 128) -> list[int]:
    return np.random.RandomState(seed).randint(3, vocab - 1, length).tolist()


def _hf_greedy(ref, prompt: list[int], new: int = NEW, **kwargs) -> list[int]:
    """transformers' greedy generate on the prompt alone: its new tokens up to and with eos."""
    ids = torch.tensor([prompt])
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                       do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


# ---- parity with transformers' generate -----------------------------------------------------

def test_short_prompt_matches_transformers(longrope_model):
    model, ref = longrope_model
    prompt = _prompt(6, seed=0)  # 6 + 24 stays below original_max: short factors throughout
    [out] = model.generate(prompt, max_new_tokens=NEW)
    assert out.token_ids == _hf_greedy(ref, prompt)
    assert out.text is None and out.finish_reason in ("stop", "length")


def test_padded_batch_matches_each_row_alone(longrope_model):
    """Rows of 3, 11 and 25 tokens, left-padded together; two of them cross original_max at
    different steps. Each row must equal transformers on that row alone, and ours alone."""
    model, ref = longrope_model
    prompts = [_prompt(n, seed=n) for n in (3, 11, 25)]
    batch = model.generate(prompts, max_new_tokens=NEW)
    for prompt, out in zip(prompts, batch, strict=True):
        assert out.token_ids == _hf_greedy(ref, prompt)
        [alone] = model.generate(prompt, max_new_tokens=NEW)
        assert alone.token_ids == out.token_ids


def test_longrope_crossing_matches_transformers(longrope_model):
    model, ref = longrope_model
    prompt = _prompt(20, seed=5)  # length 33 = original_max + 1 at the 13th new token
    [out] = model.generate(prompt, max_new_tokens=NEW)
    assert len(out.token_ids) > 13, "the generation must cross original_max"
    assert out.token_ids == _hf_greedy(ref, prompt)


def test_sliding_window_matches_transformers(window_model):
    model, ref = window_model
    prompt = _prompt(12, seed=6)  # window 8 < 12 + 24
    [out] = model.generate(prompt, max_new_tokens=NEW)
    assert out.token_ids == _hf_greedy(ref, prompt)
    # The same weights without the window generate something else, so the window was honoured.
    config = dataclasses.replace(model.config, sliding_window=None)
    unwindowed = Phi3(config, abstract_model(config)[0], model.params,
                      generation_config=model.generation_config)
    [full] = unwindowed.generate(prompt, max_new_tokens=NEW)
    assert full.token_ids != out.token_ids


def test_phi4mini_matches_transformers(phi4mini_model):
    """Partial rotary, tied head, GQA, LongRoPE crossing during generation."""
    model, ref = phi4mini_model
    for prompt in (_prompt(7, seed=7), _prompt(20, seed=8)):
        [out] = model.generate(prompt, max_new_tokens=NEW)
        assert out.token_ids == _hf_greedy(ref, prompt)


def test_repetition_penalty_matches_transformers(window_model):
    model, ref = window_model
    prompt = _prompt(12, seed=9, vocab=12)  # few distinct ids: the penalty bites
    [out] = model.generate(prompt, max_new_tokens=NEW, repetition_penalty=1.5)
    assert out.token_ids == _hf_greedy(ref, prompt, repetition_penalty=1.5)
    [plain] = model.generate(prompt, max_new_tokens=NEW)
    assert plain.token_ids != out.token_ids


# ---- incremental decoding equals the full forward -------------------------------------------

def _check_logprobs_against_full_forward(model, prompt, out):
    """Each new token's logprob (the raw log-softmax it was drawn from) equals the log-softmax
    of model.logits on the whole sequence before it (which, alone, decides its LongRoPE
    factors)."""
    sequence = prompt + out.token_ids
    for j, lp in enumerate(out.logprobs):
        before = sequence[:len(prompt) + j]
        full = np.asarray(jax.nn.log_softmax(np.asarray(model.logits([before]))[0, -1]))
        assert lp.token_id == out.token_ids[j]
        np.testing.assert_allclose(lp.logprob, full[lp.token_id], rtol=1e-5, atol=1e-5)
        top_ids = [i for i, _ in lp.top]
        assert top_ids == np.argsort(-full)[:len(top_ids)].tolist()
        np.testing.assert_allclose([v for _, v in lp.top], full[top_ids], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths", [(20, 7), (12,)])
def test_cached_logits_equal_full_forward(longrope_model, window_model, lengths):
    """Each drawn token's logprob equals the log-softmax of model.logits on the whole sequence
    so far: across the LongRoPE re-prefill (20 + 13 crosses; 7 + 24 does not), and under a
    sliding window shorter than the sequence."""
    model = longrope_model[0] if len(lengths) == 2 else window_model[0]
    prompts = [_prompt(n, seed=10 + n) for n in lengths]
    outs = model.generate(prompts, max_new_tokens=NEW, logprobs=3, ignore_eos=True)
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(out.token_ids) == NEW
        _check_logprobs_against_full_forward(model, prompt, out)
    assert len(lengths) == 1 or len(prompts[0]) + NEW > ORIGINAL_MAX + 1


def test_always_long_equals_long_factor_forward(longrope_model):
    """The "always long" policy: every position uses the long factors, so each drawn token's
    logprob equals a full forward forced to long factors, and no re-prefill happens."""
    model, _ = longrope_model
    module = model.module()
    prompt = _prompt(9, seed=11)
    [out] = model.generate(prompt, max_new_tokens=NEW, rope_policy="always_long", logprobs=0,
                           ignore_eos=True)
    sequence = np.asarray([prompt + out.token_ids], np.int32)
    positions = np.arange(sequence.shape[1], dtype=np.int32)[None]
    full, _ = module(sequence, positions, use_long=np.ones(1, bool))
    full = np.asarray(jax.nn.log_softmax(np.asarray(full)[0], axis=-1))
    for j, lp in enumerate(out.logprobs):
        np.testing.assert_allclose(lp.logprob, full[len(prompt) + j - 1, lp.token_id],
                                   rtol=1e-5, atol=1e-5)
    [short] = model.generate(prompt, max_new_tokens=NEW)
    [long] = model.generate(prompt, max_new_tokens=NEW, rope_policy="always_long")
    assert short.token_ids != long.token_ids  # the trade-off: not transformers' output


# ---- stopping -------------------------------------------------------------------------------

def test_rows_stop_on_their_own_eos_and_stay_padded(longrope_model):
    model, _ = longrope_model
    prompts = [_prompt(5, seed=12), _prompt(9, seed=13)]
    free = model.generate(prompts, max_new_tokens=NEW)
    # Pick, as an extra eos, a token row 0 generates for the first time at step j >= 2.
    ids0 = free[0].token_ids
    j = next(j for j in range(2, len(ids0)) if ids0[j] not in ids0[:j])
    eos = ids0[j]
    stopped = model.generate(prompts, max_new_tokens=NEW, stop_token_ids=[eos])
    assert stopped[0].token_ids == ids0[:j + 1] and stopped[0].finish_reason == "stop"
    ids1 = free[1].token_ids
    cut = ids1.index(eos) + 1 if eos in ids1 else len(ids1)
    assert stopped[1].token_ids == ids1[:cut]


def test_max_new_tokens_and_context_limit(longrope_model):
    model, _ = longrope_model
    [out] = model.generate(_prompt(5, seed=14), max_new_tokens=3, stop_token_ids=[])
    assert len(out.token_ids) <= 3
    limit = model.config.max_position_embeddings
    [edge] = model.generate(_prompt(limit - 2, seed=15), max_new_tokens=NEW)
    assert len(edge.token_ids) <= 2  # the context ends two tokens later
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(_prompt(limit, seed=16), max_new_tokens=1)


def test_text_stop_strings_and_streaming(text_model):
    model = text_model
    tok = model.tokenizer
    [full] = model.generate("the quick brown fox", max_new_tokens=NEW)
    assert full.text == tok.decode(
        full.token_ids[:-1] if full.finish_reason == "stop" else full.token_ids,
        skip_special_tokens=True)
    # Streaming yields deltas that join to the same text, spaces included.
    chunks = []
    [streamed] = model.generate("the quick brown fox", max_new_tokens=NEW, stream=chunks.append)
    assert (streamed.token_ids, streamed.text, streamed.finish_reason) == \
        (full.token_ids, full.text, full.finish_reason)
    assert "".join(c.text for c in chunks) == full.text
    assert any(c.text.startswith(" ") for c in chunks[1:])  # a space that starts a piece
    assert sum(len(c.token_ids) for c in chunks) == len(full.token_ids)
    assert chunks[-1].finish_reason == full.finish_reason
    # A stop string from the middle of the text ends the row there, text trimmed before it.
    text = full.text
    assert len(text) > 8, text
    start = len(text) // 2
    stop = text[start:start + 3]
    [cut] = model.generate("the quick brown fox", max_new_tokens=NEW, stop=["@@never", stop])
    assert cut.text == text[:text.find(stop)] and cut.finish_reason == "stop"
    n = len(cut.token_ids)
    assert cut.token_ids == full.token_ids[:n]
    assert stop in tok.decode(cut.token_ids, skip_special_tokens=True)
    assert stop not in tok.decode(cut.token_ids[:-1], skip_special_tokens=True)
    # Streaming with the stop string never shows text past it.
    pieces = []
    model.generate("the quick brown fox", max_new_tokens=NEW, stop=stop, stream=pieces.append)
    assert "".join(c.text for c in pieces) == cut.text


# ---- sampling, compilation, errors ----------------------------------------------------------

def test_sampling_is_reproducible_and_reuses_the_compiled_loop(longrope_model):
    model, _ = longrope_model
    prompt = _prompt(6, seed=17)
    settings = dict(max_new_tokens=NEW, temperature=0.8, top_k=20, top_p=0.95)
    [a] = model.generate(prompt, seed=3, **settings)
    size = programs.decode._cache_size()
    [again] = model.generate(prompt, seed=3, **settings)
    assert again.token_ids == a.token_ids
    assert model.generate(prompt, seed=4, **settings)[0].token_ids != a.token_ids
    model.generate(prompt, seed=3, **{**settings, "temperature": 1.1, "top_k": 7})
    assert programs.decode._cache_size() == size  # new numbers, same program


def test_graphdef_is_hashed_once_and_loads_share_programs(tmp_path, count_compiles,
                                                          monkeypatch):
    """jit hashes its static arguments on every call; the model's graphdef (a tree of every
    layer's nodes) is hashed once, at load, not per prefill, decode chunk or forward pass. A
    second load of the same architecture makes an equal key and compiles nothing."""
    from flax import nnx

    path = make_hf_checkpoint(tmp_path / "ckpt", seed=19, num_hidden_layers=3)
    model = phi3_jax.load(path)
    prompt = _prompt(9, seed=19)
    first = model.generate(prompt, max_new_tokens=4, stream=lambda chunk: None)
    model.logits([prompt])
    hashes = []
    real_hash = nnx.graphlib.GraphDef.__hash__
    monkeypatch.setattr(nnx.graphlib.GraphDef, "__hash__",
                        lambda self: hashes.append(1) or real_hash(self))
    model.generate(prompt, max_new_tokens=4, stream=lambda chunk: None)  # 1 + 3 dispatches
    model.logits([prompt])
    assert hashes == []
    count_compiles.clear()
    again = phi3_jax.load(path)
    assert again.graph == model.graph and again.graph is not model.graph
    assert len(hashes) == 1  # its own, once
    assert [c.token_ids for c in again.generate(prompt, max_new_tokens=4,
                                                stream=lambda chunk: None)] == \
        [c.token_ids for c in first]
    assert count_compiles == []
    # A different architecture is a different key.
    other = phi3_jax.load(make_hf_checkpoint(tmp_path / "other", seed=19, num_hidden_layers=2))
    assert other.graph != model.graph


def test_bad_requests(longrope_model):
    model, _ = longrope_model
    with pytest.raises(ValueError, match="no tokenizer"):
        model.generate("hello", max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.generate([1, 2, 500], max_new_tokens=2)
    with pytest.raises(ValueError, match="rope_policy"):
        model.generate([1, 2], rope_policy="sometimes")
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate([1, 2], max_new_tokens=0)
    with pytest.raises(ValueError, match="prompt 1"):
        model.generate([[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="need a tokenizer"):
        model.generate([1, 2], stop="x")


def test_bucket_lengths_bound_waste_and_shapes():
    from phi3_jax.compilation import bucket_length

    for per_octave, waste in ((1, 2.0), (4, 1.25)):
        buckets = {bucket_length(n, per_octave=per_octave) for n in range(1, 4097)}
        for n in range(17, 4097):  # at least n, at most `waste` times n
            assert n <= bucket_length(n, per_octave=per_octave) <= waste * n
        # Compiled shapes: `per_octave` per octave above the minimum, 8 octaves from 16 to 4096.
        assert len(buckets) == 1 + 8 * per_octave
    assert bucket_length(1088, per_octave=4) == 1280  # a 1k prompt + 64 new tokens
