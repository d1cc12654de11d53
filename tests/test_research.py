"""The research API against transformers (torch, CPU, fp32, eager attention) on tiny random
checkpoints: captured activations, hooks in logits and greedy generation, inputs_embeds
gradients, scoring; and that a hook's new values compile nothing.

Tolerance: for each compared tensor, max |ours - ref| <= 1e-5 * max(1, max |ref|), i.e. 1e-5
absolute for values of magnitude <= 1 (attention probabilities, logprobs near 0) and 1e-5
relative to the tensor's largest entry otherwise (hidden states and logits of O(1-10): two fp32
implementations summing in different orders differ by ~1e-6 of that, a wrong mask, rotation
or head order by O(1)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ORIGINAL_MAX

from phi3_jax import hooks
from phi3_jax.functional import forward, run_with_cache
from phi3_jax.scoring import score_tokens

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

TOL = 1e-5


def assert_close(ours, ref, what: str) -> None:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err = float(np.max(np.abs(ours - ref)))
    bound = TOL * max(1.0, float(np.max(np.abs(ref))))
    assert err <= bound, f"{what}: max |diff| {err:.3g} > {bound:.3g}"


def left_padded(lengths, vocab, seed=0):
    """(ids [B, T], mask [B, T]) with row i's lengths[i] random tokens at its right end."""
    rs = np.random.RandomState(seed)
    T = max(lengths)
    ids = np.zeros((len(lengths), T), np.int64)
    mask = np.zeros((len(lengths), T), np.int64)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = rs.randint(3, vocab, n)
        mask[i, T - n:] = 1
    return ids, mask


def hf_outputs(ref, row):
    with torch.no_grad():
        return ref(torch.from_numpy(row[None]), output_hidden_states=True,
                   output_attentions=True)


# LongRoPE: a left-padded batch whose rows straddle original_max (32), so one batch holds
# both regimes. Window: rows longer than the window of 8.
@pytest.mark.parametrize("fixture,lengths", [("longrope_model", (60, 20, ORIGINAL_MAX + 1)),
                                             ("window_model", (30, 12))])
def test_captures_match_transformers(request, fixture, lengths):
    """Every layer's hidden states and attention probabilities, and the embedding and final
    norm, equal transformers' output_hidden_states / output_attentions for each row alone."""
    ours, ref = request.getfixturevalue(fixture)
    L = ours.config.num_hidden_layers
    ids, mask = left_padded(lengths, ours.config.vocab_size)
    logits, cache = ours.run_with_cache(ids, mask, names=("embed", "resid_post", "attn.probs",
                                                          "final_norm"))
    T = ids.shape[1]
    for b, n in enumerate(lengths):
        out = hf_outputs(ref, ids[b, T - n:])
        hs = [h[0].numpy() for h in out.hidden_states]  # embed, layers 0..L-2, final norm
        assert_close(cache["embed"][b, T - n:], hs[0], f"row {b} embed")
        for i in range(L - 1):
            assert_close(cache[f"layers.{i}.resid_post"][b, T - n:], hs[i + 1],
                         f"row {b} layer {i}")
        assert_close(cache["final_norm"][b, T - n:], hs[L], f"row {b} final norm")
        for i in range(L):
            assert_close(cache[f"layers.{i}.attn.probs"][b, :, T - n:, T - n:],
                         out.attentions[i][0].numpy(), f"row {b} layer {i} probs")
            # padding keys get no weight
            assert not np.any(np.asarray(cache[f"layers.{i}.attn.probs"][b, :, :, :T - n]))
        assert_close(logits[b, T - n:], out.logits[0].numpy(), f"row {b} logits")
    if fixture == "window_model":  # the window matters: keys beyond it get no weight
        probs = np.asarray(cache["layers.0.attn.probs"][0, :, -1])
        assert np.all(probs[:, :-ours.config.sliding_window] == 0)


def test_attention_probs_take_the_reference_path_for_their_layer_only(window_model,
                                                                      force_blocked):
    """Long rows take the blocked attention; capturing layer 0's probabilities moves only
    layer 0 to the reference attention, and the logits do not change."""
    ours, _ = window_model
    calls = force_blocked(8)
    ids, mask = left_padded((40, 33), ours.config.vocab_size, seed=1)
    plain = ours.logits(ids, mask)
    assert calls == [8]  # one trace, shared by both layers
    calls.clear()
    jax.clear_caches()  # the layer's trace is cached: trace both layers again
    logits, cache = ours.run_with_cache(ids, mask, names="layers.0.attn.probs")
    assert calls == [8]  # layer 1 still blocked; layer 0 not
    assert list(cache) == ["layers.0.attn.probs"]
    assert_close(logits, plain, "logits")


def steer_ref(ref, layer, vector):
    """A transformers forward hook adding `vector` to layer `layer`'s output."""
    v = torch.from_numpy(vector)

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + v, *output[1:])
        return output + v

    return ref.model.layers[layer].register_forward_hook(hook)


def test_steering_hook_matches_transformers_forward_hook(longrope_model):
    """add(v) at layers.0.resid_post equals a torch forward hook on layer 0 adding v, in
    logits (left-padded batch) and in greedy generation (which crosses original_max)."""
    ours, ref = longrope_model
    D = ours.config.hidden_size
    vector = np.random.RandomState(5).randn(D).astype(np.float32)
    steer = {"layers.0.resid_post": hooks.add(vector, 2.0)}
    ids, mask = left_padded((24, 10), ours.config.vocab_size, seed=2)
    steered = np.asarray(ours.logits(ids, mask, hooks=steer))
    handle = steer_ref(ref, 0, 2.0 * vector)
    try:
        for b, n in enumerate((24, 10)):
            with torch.no_grad():
                want = ref(torch.from_numpy(ids[b:b + 1, -n:])).logits[0].numpy()
            assert_close(steered[b, -n:], want, f"row {b} steered logits")
        prompt = ids[0, -24:]
        with torch.no_grad():
            want = ref.generate(torch.from_numpy(prompt[None]), max_new_tokens=16,
                                do_sample=False, attention_mask=torch.ones(1, 24, dtype=int),
                                pad_token_id=0)[0, 24:].tolist()
    finally:
        handle.remove()
    got = ours.generate([prompt.tolist()], max_new_tokens=16, ignore_eos=True,
                        hooks=steer)[0].token_ids
    plain = ours.generate([prompt.tolist()], max_new_tokens=16, ignore_eos=True)[0].token_ids
    assert got == want[:len(got)] and len(got) == 16
    assert got != plain  # the steering changes the generation
    # and the logits: far beyond the tolerance
    assert np.max(np.abs(steered - np.asarray(ours.logits(ids, mask)))) > 0.1


def test_inputs_embeds_gradients_match_torch_autograd(window_model):
    """d(sum(logits * w)) / d(inputs_embeds) through phi3_jax.functional.forward equals torch
    autograd's through transformers' inputs_embeds, and the logits agree."""
    ours, ref = window_model
    rs = np.random.RandomState(3)
    T, V = 20, ours.config.vocab_size
    embeds = rs.randn(2, T, ours.config.hidden_size).astype(np.float32)
    w = rs.randn(2, T, V).astype(np.float32)

    def objective(e):
        return jnp.sum(forward(ours.params, ours.graphdef, inputs_embeds=e) * w)

    grad = jax.jit(jax.grad(objective))(jnp.asarray(embeds))
    e = torch.from_numpy(embeds).requires_grad_(True)
    logits = ref(inputs_embeds=e).logits
    (logits * torch.from_numpy(w)).sum().backward()
    assert_close(grad, e.grad.numpy(), "d objective / d inputs_embeds")
    assert_close(forward(ours.params, ours.graphdef, inputs_embeds=jnp.asarray(embeds)),
                 logits.detach().numpy(), "logits from inputs_embeds")
    # model.logits takes them too (packed, left-padded here), and equals the token path
    ids, mask = left_padded((12, 7), V, seed=4)
    table = np.asarray(ours.params["model"]["embed_tokens"]["weight"][...])
    assert_close(ours.logits(inputs_embeds=table[ids], attention_mask=mask),
                 ours.logits(ids, mask), "logits(inputs_embeds=table[ids])")


def test_pure_run_with_cache_is_jittable_with_hooks_and_positions(window_model):
    """functional.run_with_cache under the caller's jit, positions from the mask, equals the
    model's run_with_cache (packed layout) on a left-padded batch."""
    ours, _ = window_model
    ids, mask = left_padded((15, 9), ours.config.vocab_size, seed=6)
    names = ("layers.1.attn.heads", "layers.0.mlp_out")
    h = {"layers.0.attn.heads": hooks.scale_heads(jnp.array([1.0, 0.0, 1.0, 1.0]))}
    f = jax.jit(run_with_cache, static_argnums=1, static_argnames="capture")
    logits, cache = f(ours.params, ours.graphdef, jnp.asarray(ids),
                      attention_mask=jnp.asarray(mask), hooks=h, capture=names)
    want_logits, want = ours.run_with_cache(ids, mask, names=names, hooks=h)
    valid = mask.astype(bool)
    assert_close(np.asarray(logits)[valid], np.asarray(want_logits)[valid], "logits")
    for name in names:
        assert_close(np.asarray(cache[name])[valid], np.asarray(want[name])[valid], name)
    # mean-ablating head 1 with a zero mean is zeroing it (the scale_heads hook above)
    N, H = 4, ours.config.head_dim
    zero = {"layers.0.attn.heads": hooks.mean_ablate([1], np.zeros((N, H)), N)}
    assert_close(forward(ours.params, ours.graphdef, jnp.asarray(ids),
                         attention_mask=jnp.asarray(mask), hooks=zero), logits, "mean 0")


def test_new_hook_values_compile_nothing(longrope_model, count_compiles):
    """Steering vectors, scales, head masks and patches are traced: after one call of each
    kind, new values compile nothing, in logits, run_with_cache and generation."""
    ours, _ = longrope_model
    D, N = ours.config.hidden_size, ours.config.num_attention_heads
    ids, mask = left_padded((20, 11), ours.config.vocab_size, seed=7)
    def interventions(seed):
        rs = np.random.RandomState(seed)
        return {"layers.1.resid_mid": hooks.add(rs.randn(D).astype(np.float32), rs.rand()),
                "layers.0.attn.heads": hooks.scale_heads(rs.rand(N).astype(np.float32)),
                "embed": hooks.patch(rs.randn(4, D).astype(np.float32))}

    def run(seed):
        h = interventions(seed)
        out = ours.logits(ids, mask, hooks=h)
        ours.run_with_cache(ids, mask, names=("resid_post",), hooks=h)
        gen = ours.generate([ids[1, -11:].tolist()], max_new_tokens=4, ignore_eos=True,
                            hooks=h)
        return np.asarray(out), gen[0].token_ids

    first = run(0)
    count_compiles.clear()
    second = run(1)
    assert count_compiles == []
    assert np.max(np.abs(first[0] - second[0])) > 0.1  # the new values did act


def test_train_step_loss_takes_hooks(window_model):
    """The train step's loss with a steering hook equals transformers' loss with the same
    forward hook (and differs from the unhooked loss)."""
    from phi3_jax.train.step import ModelSpec, make_loss_fn

    ours, ref = window_model
    rs = np.random.RandomState(9)
    T = 24
    ids = rs.randint(3, ours.config.vocab_size, (1, T))
    batch = {"input_ids": jnp.asarray(ids, jnp.int32), "labels": jnp.asarray(ids, jnp.int32),
             "positions": jnp.arange(T, dtype=jnp.int32)[None]}
    vector = rs.randn(ours.config.hidden_size).astype(np.float32)
    loss_fn = jax.jit(make_loss_fn(ModelSpec(ours.graphdef, jnp.float32, None)))
    total, count = loss_fn(ours.params, None, batch, {"layers.1.resid_pre": hooks.add(vector)})
    plain, _ = loss_fn(ours.params, None, batch)
    handle = steer_ref(ref, 0, vector)  # layer 0's output is layer 1's input
    try:
        with torch.no_grad():
            want = float(ref(torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss)
    finally:
        handle.remove()
    assert_close(float(total / count), want, "hooked loss")
    assert abs(float(plain / count) - want) > 1e-2


# ---- scoring -------------------------------------------------------------------------------

def hf_logprobs(ref, ids):
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).numpy()


PAIRS = [("The quick brown", " fox jumps"), ("Hello ", "world"),  # a trailing space moves
         ("", "An empty context"), ("x = 3", ". So x is 3.")]


@pytest.fixture(scope="module")
def text_pair(tmp_path_factory):
    """(our model, transformers' model, the checkpoint's tokenizer in transformers) on a random
    checkpoint with a Phi-3-style tokenizer and the Hub's tokenizer.json. The reference
    tokenizer is PreTrainedTokenizerFast on that tokenizer.json: transformers v5's AutoTokenizer
    re-normalizes Llama-style tokenizers and gives other ids (test_tokenizer.py)."""
    from conftest import hf_model, make_hf_checkpoint
    from tokenizer_fixtures import SP_VOCAB_SIZE, make_phi3_dir, write_hub_tokenizer_json
    from transformers import PreTrainedTokenizerFast

    import phi3_jax

    path = tmp_path_factory.mktemp("score") / "ckpt"
    make_phi3_dir(path)
    write_hub_tokenizer_json(path)
    make_hf_checkpoint(path, seed=4, vocab_size=SP_VOCAB_SIZE + 16)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token="<s>")
    return phi3_jax.load(path), hf_model(path), tok


def test_score_equals_log_softmax_of_transformers_logits(text_pair):
    """score() tokenizes like lm-eval's HF backend (the whole string with transformers'
    tokenizer, split after the context's tokens; BOS for an empty context) and each token's
    logprob is the log-softmax of transformers' logits before it."""
    ours, ref, hf_tok = text_pair
    scores = ours.score([c for c, _ in PAIRS], [k for _, k in PAIRS], batch_size=3)
    for (context, continuation), s in zip(PAIRS, scores, strict=True):
        if context:
            n = len(context.rstrip())
            whole = hf_tok(context + continuation, add_special_tokens=False).input_ids
            context_ids = hf_tok(context[:n], add_special_tokens=False).input_ids
        else:
            context_ids = [hf_tok.bos_token_id]
            whole = context_ids + hf_tok(continuation, add_special_tokens=False).input_ids
        want_tokens = whole[len(context_ids):]
        assert s.tokens == want_tokens
        logp = hf_logprobs(ref, whole)
        at = np.arange(len(whole) - len(want_tokens) - 1, len(whole) - 1)
        want = logp[at, want_tokens]
        assert_close(s.logprobs, want, f"logprobs of {continuation!r}")
        assert_close(s.total, want.sum(), "total")
        assert s.is_greedy == bool(np.all(logp[at].argmax(-1) == want_tokens))
    # a continuation made of the model's own greedy tokens is greedy
    context_ids = hf_tok("Hello", add_special_tokens=False).input_ids
    greedy = ours.generate([context_ids], max_new_tokens=3, ignore_eos=True)[0].token_ids
    assert score_tokens(ours, [(context_ids, greedy)])[0].is_greedy
    assert not score_tokens(ours, [(context_ids, [greedy[0], (greedy[1] + 1) % 100 + 3])])[
        0].is_greedy


def test_rolling_loglikelihood_and_perplexity(text_pair):
    """One window: the text's total logprob after BOS, from transformers' logits. Smaller
    windows score every token once (the same count), each conditioned on fewer tokens."""
    ours, ref, hf_tok = text_pair
    text = "the quick brown fox jumps over the lazy dog, again and again and again"
    ids = [hf_tok.bos_token_id, *hf_tok(text, add_special_tokens=False).input_ids]
    logp = hf_logprobs(ref, ids)
    want = logp[np.arange(len(ids) - 1), ids[1:]].sum()
    (total,) = ours.loglikelihood_rolling([text])
    assert_close(total, want, "rolling total")
    assert_close(ours.perplexity(text), np.exp(-want / (len(ids) - 1)), "perplexity")
    windowed = ours.loglikelihood_rolling(text, window=5)[0]
    assert windowed != pytest.approx(total, abs=1e-3)


def test_score_cli(text_pair, tmp_path):
    """`phi3-jax score` on a JSONL of pairs and texts, and on a text file, matches the API."""
    import json

    from phi3_jax.cli import main

    ours, _, _ = text_pair
    lines = [{"context": c, "continuation": k, "id": i} for i, (c, k) in enumerate(PAIRS[:2])]
    lines.append({"text": "the lazy dog"})
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(ours.path), "--input", str(src), "--output",
                 str(out), "--no-progress"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    want = ours.score([c for c, _ in PAIRS[:2]], [k for _, k in PAIRS[:2]])
    for record, s in zip(got, want, strict=False):
        assert record["logprobs"] == pytest.approx(s.logprobs, abs=1e-6)
        assert record["is_greedy"] == s.is_greedy and "id" in record
    assert got[2]["loglikelihood"] == pytest.approx(
        ours.loglikelihood_rolling("the lazy dog")[0], abs=1e-5)
    text = tmp_path / "doc.txt"
    text.write_text("the lazy dog")
    assert main(["score", "--model", str(ours.path), "--input", str(text),
                 "--no-progress"]) == 0


def test_logits_pad_the_batch_to_the_data_axis_and_replace_params(window_model):
    """On a data=2 mesh, logits and run_with_cache take 3 rows (padded to 4, as generate pads)
    and equal the unsharded model; replace(params=...) gives a new handle, the old unchanged."""
    import phi3_jax
    from phi3_jax.sharding import make_mesh

    ours, _ = window_model
    sharded = phi3_jax.load(ours.path, mesh=make_mesh("data=2", jax.devices()[:2]))
    ids, mask = left_padded((9, 5, 7), ours.config.vocab_size, seed=10)
    assert_close(sharded.logits(ids, mask), ours.logits(ids, mask), "sharded logits")
    _, cache = sharded.run_with_cache(ids, mask, names="layers.1.resid_mid")
    assert cache["layers.1.resid_mid"].shape == (3, 9, ours.config.hidden_size)
    zeroed = jax.tree.map(jnp.zeros_like, ours.params)
    edited = ours.replace(params=zeroed)
    assert edited.params is zeroed and edited.tokenizer is ours.tokenizer
    assert not np.any(np.asarray(edited.logits(ids, mask)))
    assert np.any(np.asarray(ours.logits(ids, mask)))


def test_research_tour_example_runs():
    """examples/research_tour.py on the embedded model: its four parts run, and its scoring
    part finds the right answer greedy and a wrong one not."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(root / "examples" / "research_tour.py")],
                          capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    for part in ("1. activations", "2. ", "3. head ablation", "4. scoring"):
        assert f"\n{part}" in "\n" + out, part
    scored = {line.split(":")[0].strip(): line for line in out.splitlines()
              if line.strip().startswith("'x = ")}
    assert scored["'x = 4'"].endswith("greedy True"), out[-1500:]
    assert scored["'x = 5'"].endswith("greedy False"), out[-1500:]
