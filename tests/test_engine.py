"""The inference engine: continuous batching against transformers' `generate` on each prompt
alone (greedy, fp32, tiny random models), per-request seeds and logprobs, stopping,
cancellation, bad requests, bounded compilation, its own thread, and device errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import ORIGINAL_MAX, make_hf_checkpoint

import phi3_jax
from phi3_jax.engine import Engine, GenerationSettings, QueueFull, SettingsError, programs
from phi3_jax.engine.scheduler import Chunk, Shapes

# One engine shape for most tests, so their compiled programs are shared: 3 rows, 16-token
# prompt chunks (so short test prompts are chunked), up to 4 decode steps per device call.
ENGINE = dict(max_slots=3, max_len=128, prefill_chunk=16, decode_steps=4)


def _prompt(length: int, seed: int, vocab: int = 128) -> list[int]:
    return np.random.RandomState(seed).randint(3, vocab - 1, length).tolist()


def _hf_generate(ref, prompt: list[int], new: int, **kwargs):
    ids = torch.tensor([prompt])
    return ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                        do_sample=False, **kwargs)


def _hf_greedy(ref, prompt: list[int], new: int) -> list[int]:
    """transformers' greedy generate on the prompt alone: its new tokens up to and with eos."""
    return _hf_generate(ref, prompt, new)[0, len(prompt):].tolist()


def _drive(engine: Engine, plan: dict[int, list[tuple]]) -> dict:
    """Steps the engine, submitting plan[i] = [(name, prompt, settings), ...] before step i;
    returns name -> Request once everything has finished."""
    requests, step = {}, 0
    while step <= max(plan) or engine.has_work():
        for name, prompt, settings in plan.get(step, []):
            requests[name] = engine.submit(prompt, **settings)
        engine.step()
        step += 1
    return requests


# ---- continuous batching against transformers -----------------------------------------------

def test_requests_joining_and_leaving_match_transformers_alone(longrope_model):
    """Six requests join three rows at different steps and leave at different lengths. Each
    equals transformers' generate on its prompt alone: prompts chunked (> 16 tokens), one
    already past original_max (long factors from the start), and two that cross it while
    other rows decode (each re-prefilled alone)."""
    model, ref = longrope_model
    engine = model.engine(**ENGINE)
    specs = {"a": (3, 24), "b": (11, 5), "c": (25, 24), "d": (40, 10), "e": (20, 24),
             "f": (6, 17)}
    plan = {0: [("a", _prompt(3, 3), dict(max_new_tokens=24))],
            1: [("b", _prompt(11, 11), dict(max_new_tokens=5)),
                ("c", _prompt(25, 25), dict(max_new_tokens=24))],
            4: [("d", _prompt(40, 40), dict(max_new_tokens=10))],
            5: [("e", _prompt(20, 20), dict(max_new_tokens=24)),
                ("f", _prompt(6, 6), dict(max_new_tokens=17))]}
    requests = _drive(engine, plan)
    crossed = 0
    for name, (length, new) in specs.items():
        request = requests[name]
        assert request.token_ids == _hf_greedy(ref, _prompt(length, length), new), name
        # Re-prefilled: a token drawn after the sequence reached original_max + 1.
        crossed += length <= ORIGINAL_MAX and length + len(request.token_ids) >= ORIGINAL_MAX + 2
    assert crossed == 2
    assert engine.active == 0 and engine.waiting == 0


def test_sliding_window_rows_match_transformers(window_model):
    """A 4k-style model with an 8-token window: prompts longer than the window, and outputs
    that run past it, among other rows."""
    model, ref = window_model
    engine = model.engine(**ENGINE)
    plan = {0: [("a", _prompt(12, 6), dict(max_new_tokens=24)),
                ("b", _prompt(5, 7), dict(max_new_tokens=9))],
            3: [("c", _prompt(30, 8), dict(max_new_tokens=20))]}
    requests = _drive(engine, plan)
    for name, (n, seed, new) in {"a": (12, 6, 24), "b": (5, 7, 9), "c": (30, 8, 20)}.items():
        assert requests[name].token_ids == _hf_greedy(ref, _prompt(n, seed), new), name


def test_blocked_chunk_attention_matches_transformers(longrope_model, window_model,
                                                     force_blocked, monkeypatch):
    """Later prompt chunks attend to their row's cache in key blocks (here 4-token blocks, so
    these short prompts take it): a prompt past original_max in three chunks, a crossing
    re-prefill, and a prompt longer than the sliding window."""
    from phi3_jax import attention

    force_blocked(4)
    calls = []
    real = attention.blocked_cached_attention
    monkeypatch.setattr(attention, "blocked_cached_attention",
                        lambda *a: calls.append(a[-1]) or real(*a))
    model, ref = longrope_model
    engine = model.engine(**ENGINE)
    a = engine.submit(_prompt(40, 40), max_new_tokens=6)
    b = engine.submit(_prompt(20, 5), max_new_tokens=16)
    engine.run_until_done()
    assert a.token_ids == _hf_greedy(ref, _prompt(40, 40), 6)
    assert b.token_ids == _hf_greedy(ref, _prompt(20, 5), 16)
    model, ref = window_model
    engine = model.engine(**ENGINE)
    c = engine.submit(_prompt(30, 8), max_new_tokens=6)
    engine.run_until_done()
    assert c.token_ids == _hf_greedy(ref, _prompt(30, 8), 6)
    assert calls and set(calls) == {4}  # the blocked path was traced


# ---- per-request seeds ----------------------------------------------------------------------

def test_sampled_output_depends_on_the_request_only(longrope_model):
    """50 sampled requests (temperature 4, top-p 0.98, each its own seed): every request's
    tokens are identical whether it runs alone or among the others, in any order and so in any
    slot; two requests with the same seed and prompt draw the same tokens."""
    model, _ = longrope_model
    settings = dict(temperature=4.0, top_p=0.98, max_new_tokens=8)
    prompts = [_prompt(3 + i % 17, 100 + i) for i in range(50)]

    def run(order):
        engine = model.engine(**ENGINE)
        requests = {i: engine.submit(prompts[i], seed=1000 + i, **settings) for i in order}
        engine.run_until_done()
        return {i: r.token_ids for i, r in requests.items()}

    forward = run(range(50))
    rotated = run([*range(17, 50), *range(17)])
    reverse = run(range(49, -1, -1))
    assert forward == rotated == reverse
    for i in (0, 23, 49):
        assert run([i]) == {i: forward[i]}
    assert len({tuple(t) for t in forward.values()}) > 40  # they do sample
    engine = model.engine(**ENGINE)
    twins = [engine.submit(prompts[5], seed=7, **settings) for _ in range(2)]
    engine.run_until_done()
    assert twins[0].token_ids == twins[1].token_ids


def test_row_buckets_change_no_token_or_logprob(longrope_model, monkeypatch):
    """Decode calls run only the rows that decode (in buckets of 2 and 4 of 5 slots here):
    as requests join and leave, the buckets change, and every request's sampled tokens and
    logprobs equal, bit for bit, those of an engine whose calls run all five rows, whether a
    bucket's rows are copied out of the cache for the call (the CPU's way) or read and written
    in place by each layer (other backends')."""
    model, _ = longrope_model
    sizes, mode = [], {}
    real = programs.decode

    def spy(*args, **kwargs):
        sizes.append(args[4].tokens.shape[0])
        return real(*args, **kwargs, **mode)

    monkeypatch.setattr(programs, "decode", spy)

    def request(name: int, length: int, new: int) -> tuple:
        return name, _prompt(length, 40 + name), dict(
            max_new_tokens=new, temperature=1.5, top_k=20, seed=100 + name, logprobs=2,
            ignore_eos=True)

    news = (40, 12, 44, 30, 26, 34)
    plan = {0: [request(i, 4 + 3 * i, news[i]) for i in range(3)],
            2: [request(3, 9, news[3]), request(4, 5, news[4])], 3: [request(5, 7, news[5])]}
    results = []
    for bucket_rows, copy_window in ((True, True), (True, False), (False, None)):
        sizes.clear()
        mode["copy_window"] = copy_window
        engine = model.engine(**{**ENGINE, "max_slots": 5}, bucket_rows=bucket_rows,
                              max_logprobs=2)
        done = _drive(engine, plan)
        results.append({n: (r.token_ids, [(lp.logprob, lp.top) for lp in r.logprobs])
                        for n, r in done.items()})
        assert set(sizes) == ({2, 4, 5} if bucket_rows else {5}), sizes
    assert results[0] == results[1] == results[2]
    assert [len(results[0][n][0]) for n in range(6)] == list(news)


# ---- logprobs -------------------------------------------------------------------------------

def test_logprobs_equal_transformers_log_softmax(longrope_model):
    """Each new token's logprob and its top alternatives are the log-softmax of transformers'
    raw logits at that step (fp32, 1e-4), across a LongRoPE crossing, while another request
    decodes beside it; prompt logprobs are the log-softmax of transformers' forward."""
    model, ref = longrope_model
    engine = model.engine(**ENGINE)
    prompt = _prompt(20, seed=5)  # crosses original_max at the 13th new token
    other = engine.submit(_prompt(9, seed=9), max_new_tokens=20)
    request = engine.submit(prompt, max_new_tokens=20, logprobs=5, prompt_logprobs=3,
                            ignore_eos=True)
    engine.run_until_done()
    assert other.logprobs is None and other.prompt_logprobs is None
    out = _hf_generate(ref, prompt, 20, output_logits=True, return_dict_in_generate=True,
                       min_new_tokens=20)
    assert request.token_ids == out.sequences[0, len(prompt):].tolist()
    assert len(request.logprobs) == 20
    for lp, logits in zip(request.logprobs, out.logits, strict=True):
        theirs = torch.log_softmax(logits[0].float(), dim=-1).numpy()
        np.testing.assert_allclose(lp.logprob, theirs[lp.token_id], rtol=1e-4, atol=1e-4)
        assert len(lp.top) == 5
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(theirs)[::-1][:5],
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(theirs[[i for i, _ in lp.top]], [v for _, v in lp.top],
                                   rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        logits = ref(torch.tensor([prompt])).logits[0]
    theirs = torch.log_softmax(logits.float(), dim=-1).numpy()
    assert request.prompt_logprobs[0] is None and len(request.prompt_logprobs) == len(prompt)
    for j, lp in enumerate(request.prompt_logprobs[1:], start=1):
        assert lp.token_id == prompt[j]
        np.testing.assert_allclose(lp.logprob, theirs[j - 1, prompt[j]], rtol=1e-4, atol=1e-4)
        assert [i for i, _ in lp.top] == np.argsort(-theirs[j - 1])[:3].tolist()


# ---- stopping and finish reasons ------------------------------------------------------------

def test_stop_rules_and_finish_reasons(text_model):
    """An eos id, a stop string that spans token boundaries, max_new_tokens and the end of
    the context, each with OpenAI's finish_reason; the text never shows a stop string."""
    model = text_model
    tok = model.tokenizer
    engine = model.engine(**{**ENGINE, "max_len": 64})
    free = engine.submit("the quick brown fox", max_new_tokens=30, ignore_eos=True)
    engine.run_until_done()
    ids = free.token_ids
    assert free.finish_reason == "length" and len(ids) == 30
    # An id drawn first at step j >= 2, as a stop id.
    j = next(j for j in range(2, len(ids)) if ids[j] not in ids[:j])
    # A stop string made of the end of one token's text and the start of the next.
    pieces = [tok.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
    k = next(k for k in range(3, len(ids)) if len(pieces[k]) > len(pieces[k - 1]) + 1
             and len(pieces[k + 1]) > len(pieces[k]) + 1)
    stop = pieces[k][-2:] + pieces[k + 1][len(pieces[k]):len(pieces[k]) + 2]
    assert stop in pieces[k + 1] and stop not in pieces[k]
    requests = [engine.submit("the quick brown fox", max_new_tokens=30, ignore_eos=True,
                              stop_token_ids=[ids[j]]),
                engine.submit("the quick brown fox", max_new_tokens=30, ignore_eos=True,
                              stop=["@@", stop]),
                engine.submit("the quick brown fox", max_new_tokens=4, ignore_eos=True)]
    engine.run_until_done()
    by_id, by_text, short = requests
    assert by_id.token_ids == ids[:j + 1] and by_id.finish_reason == "stop"
    assert by_text.finish_reason == "stop" and by_text.token_ids == ids[:k + 1]
    assert by_text.completion().text == pieces[k + 1][:pieces[k + 1].find(stop)]
    assert by_text.text == by_text.completion().text  # the stream never showed the stop
    assert short.token_ids == ids[:4] and short.finish_reason == "length"
    # The context's end: a 60-token prompt in a 64-slot engine draws 4 tokens.
    edge = engine.submit(list(range(3, 63)), max_new_tokens=30, ignore_eos=True)
    engine.run_until_done()
    assert len(edge.token_ids) == 4 and edge.finish_reason == "length"


def test_cancel_frees_the_slot(longrope_model):
    model, _ = longrope_model
    engine = model.engine(**{**ENGINE, "max_slots": 1})
    first = engine.submit(_prompt(5, 1), max_new_tokens=60, ignore_eos=True)
    second = engine.submit(_prompt(6, 2), max_new_tokens=30, ignore_eos=True)
    for _ in range(3):
        engine.step()
    assert engine.active == 1 and engine.waiting == 1 and len(first.token_ids) > 1
    engine.cancel(first)
    engine.step()
    assert first.finish_reason == "cancelled" and first.finished
    assert engine.active == 1 and engine.waiting == 0  # the second took the row
    engine.run_until_done()
    assert second.finish_reason == "length" and len(second.token_ids) == 30
    waiting = engine.submit(_prompt(5, 3), max_new_tokens=3)
    engine.cancel(waiting.request_id)
    engine.run_until_done()
    assert waiting.finish_reason == "cancelled" and waiting.token_ids == []


# ---- bad requests ---------------------------------------------------------------------------

@pytest.mark.parametrize("prompt, settings, match", [
    ([], {}, "empty"),
    ("hello", {}, "no tokenizer"),
    ([5] * 128, {}, "leaves no room"),
    ([1, 2, 500], {}, "outside the vocabulary"),
    ([1, 2], dict(temperature=float("nan")), "temperature must be a finite number"),
    ([1, 2], dict(temperature=-1.0), "temperature"),
    ([1, 2], dict(temperature=True), "temperature"),
    ([1, 2], dict(top_k=1e11), "top_k must be an integer"),
    ([1, 2], dict(top_k=-3), "top_k"),
    ([1, 2], dict(top_p=1.5), "top_p"),
    ([1, 2], dict(min_p=float("inf")), "min_p"),
    ([1, 2], dict(repetition_penalty=0.0), "repetition_penalty"),
    ([1, 2], dict(max_new_tokens=0), "max_new_tokens"),
    ([1, 2], dict(max_new_tokens=2.5), "max_new_tokens"),
    ([1, 2], dict(seed="seven"), "seed"),
    ([1, 2], dict(seed=2**70), "seed"),
    ([1, 2], dict(stop=5), "stop"),
    ([1, 2], dict(stop=[""]), "stop strings"),
    ([1, 2], dict(stop="x"), "need a tokenizer"),
    ([1, 2], dict(stop_token_ids=[-1]), "stop_token_ids"),
    ([1, 2], dict(stop_token_ids=[999]), "outside the vocabulary"),
    ([1, 2], dict(stop_token_ids=list(range(3, 40))), "at most 16"),
    ([1, 2], dict(logprobs=21), "logprobs"),
    ([1, 2], dict(prompt_logprobs=-1), "prompt_logprobs"),
    ([1, 2], dict(rope_policy="sometimes"), "rope_policy"),
    ([1, 2], dict(temprature=0.5), "unknown generation settings"),
])
def test_bad_requests_are_refused_at_submit(longrope_model, prompt, settings, match):
    model, _ = longrope_model
    engine = model.engine(**ENGINE)
    with pytest.raises(ValueError, match=match):
        engine.submit(prompt, **settings)
    assert engine.waiting == 0


def test_bad_requests_do_not_disturb_those_in_flight(longrope_model):
    model, ref = longrope_model
    engine = model.engine(**ENGINE)
    prompt = _prompt(11, 11)
    request = engine.submit(prompt, max_new_tokens=20)
    for bad in (dict(temperature=float("nan")), dict(top_p=2.0), dict(logprobs=99)):
        engine.step()
        with pytest.raises(SettingsError):
            engine.submit(prompt, **bad)
    # An absurd max_new_tokens is clamped to the context, not refused.
    huge = engine.submit(_prompt(100, 1), max_new_tokens=3_000_000_000, ignore_eos=True)
    engine.run_until_done()
    assert request.token_ids == _hf_greedy(ref, prompt, 20)
    assert len(huge.token_ids) == 28 and huge.finish_reason == "length"


def test_settings_are_validated_once():
    s = GenerationSettings(stop="x", stop_token_ids=[3, 4], seed=-5)
    assert s.stop == ("x",) and s.stop_token_ids == (3, 4)
    resolved = s.resolve({"do_sample": True, "temperature": 0.6, "top_p": 0.9})
    assert (resolved.temperature, resolved.top_p, resolved.top_k) == (0.6, 0.9, 0)
    greedy = GenerationSettings(top_k=5, top_p=0.5).resolve({})
    assert (greedy.temperature, greedy.top_k, greedy.top_p) == (0.0, 0, 1.0)  # ignored
    assert GenerationSettings().resolve({"max_new_tokens": 77}).max_new_tokens == 77
    with pytest.raises(SettingsError, match="top_p"):  # a bad generation_config value
        GenerationSettings(temperature=0.5).resolve({"do_sample": True, "top_p": 7})


def test_queue_full_raises(longrope_model):
    model, _ = longrope_model
    engine = model.engine(**ENGINE, max_queue=1)
    engine.submit([5, 6], max_new_tokens=2)
    with pytest.raises(QueueFull):
        engine.submit([5, 6], max_new_tokens=2)
    engine.run_until_done()


# ---- the program set ------------------------------------------------------------------------

def test_chunks_and_program_shapes():
    shapes = Shapes(max_slots=4, max_len=100, prefill_chunk=32, decode_steps=4, top_n=2)
    assert shapes.chunks(20) == [Chunk(0, 20, 24, 0)]
    assert shapes.chunks(70) == [Chunk(0, 32, 32, 0), Chunk(32, 32, 32, 64),
                                 Chunk(64, 6, 32, 96)]
    assert shapes.read_lengths() == [16, 24, 32, 48, 64, 96, 100]
    assert shapes.read_len(97) == 100
    assert shapes.row_counts() == [2, 4] and shapes.decode_rows(1) == 2
    assert Shapes(9, 100, 32, 4, 0).row_counts() == [2, 4, 8, 9]
    assert Shapes(1, 100, 32, 4, 0).row_counts() == [1]
    assert Shapes(9, 100, 32, 4, 0, bucket_rows=False).row_counts() == [9]
    programs_ = shapes.program_shapes()
    assert ("prefill", 16, 0) in programs_ and ("decode", 4, 100) in programs_
    # First chunks of 16, 24, 32 tokens; later chunks reading 64, 96, 100 slots; decode reads
    # for 2 and 4 rows.
    assert len(programs_) == len(set(programs_)) == 3 + 3 + 7 * 2
    assert ("prefill", 32, 100) in programs_  # a chunk from 96: its read is cut at max_len
    with pytest.raises(ValueError, match="power of two"):
        Shapes(4, 100, 24, 4, 0)


def test_no_compilation_after_warmup(tmp_path, count_compiles):
    """warmup() builds every program the engine can run; 200 mixed requests (lengths from 1
    to past a chunk, greedy and sampled, logprobs, prompt logprobs, stop ids, cancellations)
    then compile nothing."""
    model = phi3_jax.load(make_hf_checkpoint(tmp_path / "ckpt", seed=21, num_hidden_layers=1,
                                             intermediate_size=80, max_position_embeddings=64))
    engine = model.engine(max_slots=4, max_len=64, prefill_chunk=16, decode_steps=4,
                          max_logprobs=2)
    built = engine.warmup(threads=2)
    assert built == 2 * (len(engine.shapes.chunk_lengths())
                         + len(engine.shapes.later_chunk_read_lengths())) \
        + len(engine.shapes.read_lengths()) * len(engine.shapes.row_counts())
    count_compiles.clear()
    rs = np.random.RandomState(0)
    requests = []
    for i in range(200):
        settings = dict(max_new_tokens=int(rs.randint(1, 12)))
        if i % 3 == 0:
            settings.update(temperature=float(rs.uniform(0.5, 2.0)), top_k=int(rs.randint(0, 9)),
                            top_p=float(rs.uniform(0.5, 1.0)), seed=i)
        if i % 5 == 0:
            settings["logprobs"] = int(rs.randint(0, 3))
        if i % 7 == 0:
            settings["prompt_logprobs"] = 1
        if i % 11 == 0:
            settings["stop_token_ids"] = [int(rs.randint(3, 100))]
        requests.append(engine.submit(_prompt(int(rs.randint(1, 50)), i), **settings))
        if i % 4 == 3:
            engine.step()
        if i % 13 == 0:
            engine.cancel(requests[-1])
    engine.run_until_done()
    assert all(r.finished for r in requests)
    assert count_compiles == []


def test_first_token_is_delivered_before_the_decode_call(longrope_model, monkeypatch):
    """A request whose prompt goes in while another row decodes gets its first token from the
    prefill before that step's decode call runs, not after it."""
    model, _ = longrope_model
    engine = model.engine(**ENGINE)
    events = []
    real = programs.decode

    def decode(*args, **kwargs):
        events.append("decode")
        return real(*args, **kwargs)

    monkeypatch.setattr(programs, "decode", decode)
    first = engine.submit(_prompt(5, 1), max_new_tokens=20, ignore_eos=True)
    engine.step()
    assert events == ["decode"] and len(first.token_ids) > 1
    second = engine.submit(_prompt(6, 2), max_new_tokens=20, ignore_eos=True,
                           on_output=lambda o: events.append(("second", len(o.token_ids))))
    events.clear()
    engine.step()
    assert events[:2] == [("second", 1), "decode"], events
    engine.run_until_done()
    assert len(second.token_ids) == 20 and len(first.token_ids) == 20


# ---- the engine in its own thread -----------------------------------------------------------

def test_background_thread_serves_concurrent_submitters(longrope_model):
    model, _ = longrope_model
    prompts = [_prompt(3 + 2 * i, 300 + i) for i in range(8)]
    stepped = model.engine(**ENGINE)
    expected = [stepped.submit(p, max_new_tokens=6) for p in prompts]
    stepped.run_until_done()
    engine = model.engine(**ENGINE).start()
    results: dict[int, list[int]] = {}
    streamed: dict[int, list[int]] = {}

    def client(i):
        request = engine.submit(prompts[i], max_new_tokens=6)
        streamed[i] = [t for output in request for t in output.token_ids]
        results[i] = request.result(timeout=120).token_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    engine.shutdown(grace=30)
    assert results == streamed == {i: r.token_ids for i, r in enumerate(expected)}
    with pytest.raises(RuntimeError, match="shutting down"):
        engine.submit(prompts[0])


def test_a_failing_device_call_fails_its_requests_only(longrope_model, monkeypatch):
    """A decode call that raises fails the requests it served (finish_reason "error"); the
    engine goes on, and the next requests run normally."""
    model, ref = longrope_model
    engine = model.engine(**ENGINE)
    real = programs.decode
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected device fault")
        return real(*args, **kwargs)

    monkeypatch.setattr(programs, "decode", flaky)
    hit = engine.submit(_prompt(5, 1), max_new_tokens=8)
    engine.run_until_done()
    assert hit.finish_reason == "error" and "injected device fault" in hit.error
    with pytest.raises(RuntimeError, match="injected device fault"):
        hit.result()
    after = engine.submit(_prompt(7, 2), max_new_tokens=8)
    engine.run_until_done()
    assert after.token_ids == _hf_greedy(ref, _prompt(7, 2), 8)
