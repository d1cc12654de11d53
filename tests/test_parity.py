"""End-to-end parity with transformers' Phi3ForCausalLM (torch, CPU, fp32) on tiny random configs.

Each checkpoint is made by transformers (`save_pretrained`), loaded through `phi3_jax.load` and
compared with transformers reloading the same folder. fp32 tolerance: max |diff| <= 1e-4 on
logits of O(1-10) (conftest's initializer_range 0.2), i.e. ~1e-5 relative: two fp32
implementations that sum in different orders differ by ~1e-6 here, a wrong rotation pair, mask
or factor by O(1). Cases that claim a feature also check that the feature changes the logits by
far more than the tolerance, so the comparison could fail.

Checkpoints and loaded models are built once per (case, seed) and shared across prompt lengths.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILY, TINY, longrope, make_hf_checkpoint
from flax import nnx

import phi3_jax
from phi3_jax.params import fill_state

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
# "Changes the logits" means by at least this much: a hundred times the tolerance.
MATTERS = 100 * TOL
SEEDS = (0, 1)
ORIGINAL_MAX = 64  # small original_max_position_embeddings, so prompts can cross it


def _rotary_dim(shape: dict) -> int:
    cfg = {**TINY, **shape}
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return int(head_dim * cfg.get("partial_rotary_factor", 1.0))


def case_overrides(case: str, seed: int) -> dict:
    """transformers.Phi3Config overrides for a case; LongRoPE factors vary with the seed."""
    if case == "mha":
        return {}
    if case == "gqa":
        return dict(FAMILY["gqa"])
    if case in ("longrope_short", "longrope_long"):
        return longrope(_rotary_dim({}), ORIGINAL_MAX, seed)
    if case == "phi4mini":  # partial rotary 0.75 + GQA + tied, with LongRoPE as Phi-4-mini has
        return {**FAMILY["phi4mini"],
                **longrope(_rotary_dim(FAMILY["phi4mini"]), ORIGINAL_MAX, seed)}
    if case == "window":
        return {**FAMILY["gqa"], "sliding_window": 16}
    if case == "padded":  # per-row LongRoPE and a window, under left padding
        return {**FAMILY["gqa"], **longrope(_rotary_dim(FAMILY["gqa"]), ORIGINAL_MAX, seed),
                "sliding_window": 48}
    raise KeyError(case)


# Prompt lengths per case. LongRoPE short: up to and including original_max (length 64 means
# max position 63, still short); long: from original_max + 1 on. Other cases reach T >= 100 since
# short prompts cannot catch RoPE bugs (rotations are near identity at small positions).
LENGTHS = {
    "mha": (9, 100),
    "gqa": (9, 100),
    "longrope_short": (21, ORIGINAL_MAX),
    "longrope_long": (ORIGINAL_MAX + 1, 120),
    "phi4mini": (30, 90),  # one in each LongRoPE regime
    "window": (40, 100),  # both longer than the window of 16
}
# Rows of a left-padded batch: each batch mixes rows past original_max (long) with rows not.
PADDED_ROWS = ((80, 30, ORIGINAL_MAX), (120, ORIGINAL_MAX + 1, 7))


@dataclasses.dataclass
class Pair:
    ours: phi3_jax.Phi3
    ref: object  # transformers Phi3ForCausalLM
    path: object


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """pair(case, seed) -> our loaded model and the transformers reference, built once."""
    cache: dict[tuple[str, int], Pair] = {}

    def get(case: str, seed: int) -> Pair:
        if (case, seed) not in cache:
            path = make_hf_checkpoint(tmp_path_factory.mktemp(f"{case}-{seed}"), seed=seed,
                                      **case_overrides(case, seed))
            cache[case, seed] = Pair(phi3_jax.load(path), reference(path), path)
        return cache[case, seed]

    return get


def reference(path, dtype=None, attn="eager"):
    dtype = dtype or torch.float32
    return transformers.Phi3ForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=attn).eval()


def ref_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(ids, np.int64))).logits.float().numpy()


def prompt(seed: int, lengths, vocab: int) -> np.ndarray:
    """Random token ids [len(lengths), max(lengths)], row i's tokens at its first lengths[i]."""
    rs = np.random.RandomState(1000 + seed)
    return rs.randint(0, vocab, (len(lengths), max(lengths)))


def ours_variant(model: phi3_jax.Phi3, ids: np.ndarray, use_long=None, **config_changes):
    """Our logits for unpadded ids with a modified config or a forced LongRoPE regime: what
    the test would see if the feature under test were ignored."""
    module = model.module()
    module.config = dataclasses.replace(module.config, **config_changes)
    graphdef, params = nnx.split(module)
    B, T = ids.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if use_long is not None:
        use_long = jnp.full((B,), use_long)
    return np.asarray(_forward(graphdef, params, jnp.asarray(ids, jnp.int32), positions,
                               use_long))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens, positions, use_long):
    logits, _ = nnx.merge(graphdef, params)(tokens, positions, use_long=use_long)
    return logits


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


CASES = [(case, n) for case, lengths in LENGTHS.items() for n in lengths]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case,length", CASES)
def test_logits_match_transformers(pair, case, length, seed):
    p = pair(case, seed)
    ids = prompt(seed, [length], p.ours.config.vocab_size)
    ours = np.asarray(p.ours.logits(ids))
    ref = ref_logits(p.ref, ids)
    assert ours.shape == ref.shape == (1, length, p.ours.config.vocab_size)
    assert ours.dtype == np.float32
    assert max_diff(ours, ref) <= TOL

    # The feature under test must matter, or the comparison above could not fail.
    rs = p.ours.config.rope_scaling
    if case in ("longrope_short", "longrope_long", "phi4mini"):
        is_long = length > ORIGINAL_MAX
        assert np.any(np.asarray(rs.short_factor) != 1.0)
        assert max_diff(ours_variant(p.ours, ids, use_long=not is_long), ref) > MATTERS
    if case == "phi4mini":
        assert p.ours.config.rotary_dim == 12 and p.ours.config.head_dim == 16
        assert "lm_head" not in p.ours.params
    if case == "window":
        assert length > p.ours.config.sliding_window
        assert max_diff(ours_variant(p.ours, ids, sliding_window=None), ref) > MATTERS


def left_padded(seed: int, rows: tuple[int, ...], vocab: int):
    """Rows of the given lengths, left-padded to the longest: (tokens, ids, mask)."""
    T = max(rows)
    tokens = prompt(seed, rows, vocab)
    ids = np.zeros((len(rows), T), np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for i, n in enumerate(rows):
        ids[i, T - n:] = tokens[i, :n]
        mask[i, T - n:] = 1
    return tokens, ids, mask


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("rows", PADDED_ROWS, ids=lambda r: "-".join(map(str, r)))
def test_left_padded_batch_matches_each_row_alone(pair, rows, seed):
    """Each row of a left-padded batch equals transformers on that row alone, including its own
    LongRoPE regime: the batch mixes rows past original_max with rows before it."""
    p = pair("padded", seed)
    T = max(rows)
    tokens, ids, mask = left_padded(seed, rows, p.ours.config.vocab_size)
    ours = np.asarray(p.ours.logits(ids, mask))
    regimes = set()
    for i, n in enumerate(rows):
        ref = ref_logits(p.ref, tokens[i: i + 1, :n])[0]
        assert max_diff(ours[i, T - n:], ref) <= TOL, f"row {i} ({n} tokens)"
        regimes.add(n > ORIGINAL_MAX)
    assert regimes == {True, False}


@pytest.mark.parametrize("rows", PADDED_ROWS, ids=lambda r: "-".join(map(str, r)))
def test_blocked_attention_logits_match_transformers(pair, rows, force_blocked):
    """model.logits packs each row to the front and runs it as a prefill, so long rows take the
    blocked attention (forced here with 8-token blocks): left padding, per-row LongRoPE
    regimes and a window of 48 that spans several blocks. Padding slots get zero logits."""
    calls = force_blocked(8)
    p = pair("padded", 0)
    T = max(rows)
    tokens, ids, mask = left_padded(0, rows, p.ours.config.vocab_size)
    ours = np.asarray(p.ours.logits(ids, mask))
    assert calls == [8]  # one trace of the one layer function
    for i, n in enumerate(rows):
        ref = ref_logits(p.ref, tokens[i: i + 1, :n])[0]
        assert max_diff(ours[i, T - n:], ref) <= TOL, f"row {i} ({n} tokens)"
        assert not ours[i, :T - n].any()


# bfloat16. Unit roundoff u = 2^-8 (8 significant bits). Relative to the fp32 reference, the bf16
# path rounds ~24 times per layer along any path to a logit: 7 weight matrices and 2 norm
# scales stored in bf16, and ~15 activations (norm cast and scale, qkv, 4 in the rotation,
# probabilities, probs @ v, o_proj, residual, norm, gate_up, silu, silu * up, down, residual),
# plus ~4 around the head. Summed linearly, with no growth through the layers, that is
# c = 24 L + 4 (52 for L = 2) roundings of size u * max|logit|. transformers' own bf16 logits sit at
# 8-21 u * max|logit| from its fp32 ones on these checkpoints, so the bound is neither loose
# enough to hide a bug nor tight enough to be flaky: gate and up swapped moves the logits by
# ~250-340 u * max|logit| and drops argmax agreement to ~10%.
BF16_U = 2.0 ** -8


def bf16_bound(config, ref32: np.ndarray) -> float:
    return (24 * config.num_hidden_layers + 4) * BF16_U * float(np.abs(ref32).max())


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case,length", [("gqa", 100), ("phi4mini", 90)])
def test_bfloat16_within_derived_bound(pair, case, length, seed):
    p = pair(case, seed)
    ids = prompt(seed, [length], p.ours.config.vocab_size)
    ref32 = ref_logits(p.ref, ids)
    bound = bf16_bound(p.ours.config, ref32)
    ours = phi3_jax.load(p.path, dtype="bfloat16")
    assert ours.dtype == jnp.bfloat16
    logits = np.asarray(ours.logits(ids)).astype(np.float32)
    ref16 = ref_logits(reference(p.path, dtype=torch.bfloat16), ids)
    assert max_diff(logits, ref32) <= bound
    assert max_diff(ref16, ref32) <= bound  # the derivation covers the reference's own bf16
    assert max_diff(logits, ref16) <= bound
    assert np.mean(logits.argmax(-1) == ref32.argmax(-1)) >= 0.85  # near-ties at V = 128

    # The bound catches a real bug: the same bf16 weights with gate and up swapped.
    swapped = {path: (var[...][:, ::-1] if path[-2:] == ("gate_up_proj", "weight")
                      else var[...])
               for path, var in nnx.to_flat_state(ours.params)}
    bad_params = fill_state(ours.params, swapped)
    positions = jnp.arange(length, dtype=jnp.int32)[None]
    bad = np.asarray(_forward(ours.graphdef, bad_params, jnp.asarray(ids, jnp.int32), positions,
                              None)).astype(np.float32)
    assert max_diff(bad, ref32) > 3 * bound
    assert np.mean(bad.argmax(-1) == ref32.argmax(-1)) < 0.5


def test_sdpa_reference_agrees(pair):
    """Also against transformers' SDPA attention (another mask path), with a sliding window."""
    p = pair("window", 0)
    ids = prompt(0, [100], p.ours.config.vocab_size)
    sdpa = reference(p.path, attn="sdpa")
    assert max_diff(p.ours.logits(ids), ref_logits(sdpa, ids)) <= TOL


def test_sharded_checkpoint_loads_identically(pair, tmp_path):
    """save_pretrained with a small max_shard_size (index.json + several files) loads to the
    very same parameters as the single file written from the same seed."""
    single = pair("gqa", 0)
    path = make_hf_checkpoint(tmp_path / "sharded", seed=0, max_shard_size="60KB",
                              **case_overrides("gqa", 0))
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) >= 3 and (path / "model.safetensors.index.json").is_file()
    assert not (single.path / "model.safetensors.index.json").exists()
    sharded = phi3_jax.load(path)
    flat_a = jax.tree.leaves(single.ours.params)
    flat_b = jax.tree.leaves(sharded.params)
    assert len(flat_a) == len(flat_b)
    for a, b in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = prompt(0, [33], single.ours.config.vocab_size)
    np.testing.assert_array_equal(np.asarray(single.ours.logits(ids)),
                                  np.asarray(sharded.logits(ids)))
