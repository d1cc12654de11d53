"""Config parsing for every checkpoint of the family, and full-size shapes without allocation.

The fixtures in tests/fixtures/configs/ are config.json files written from the spec's table
(phi3_spec.md section 4): every shape, id and flag is the spec's; the factor lists use the spec's
spot-check values (first and last entries) with plausible values in between, at the right
lengths (48 for head_dim 96 or for Phi-4-mini's rotary width 96, 64 for head_dim 128).
Phi-3-medium-128k's config was not found by the spec; its figures are inferred there.
"""

import json
import math
import pathlib

import jax
import numpy as np
import pytest

from phi3_jax.api import abstract_model
from phi3_jax.config import Phi3Config, longrope_attention_factor
from phi3_jax.hf_weights import tensor_specs
from phi3_jax.rope import inverse_frequencies

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "configs"

# The spec's table, by hand: H, I, L, nh, nkv, hd, rotary width, V, maxpos, orig, theta, window,
# tied, (bos, eos, pad), parameter count.
SPEC = {
    "phi3_mini_4k": (3072, 8192, 32, 32, 32, 96, 96, 32064, 4096, 4096, 1e4, 2047, False,
                     (1, 32000, 32000), 3_821_079_552),
    "phi3_mini_128k": (3072, 8192, 32, 32, 32, 96, 96, 32064, 131072, 4096, 1e4, 262144, False,
                       (1, 32000, 32000), 3_821_079_552),
    "phi3_medium_4k": (5120, 17920, 40, 40, 10, 128, 128, 32064, 4096, 4096, 1e4, 2047, False,
                       (1, 32000, 32000), 13_960_238_080),
    "phi3_medium_128k": (5120, 17920, 40, 40, 10, 128, 128, 32064, 131072, 4096, 1e4, 131072,
                         False, (1, 32000, 32000), 13_960_238_080),
    "phi35_mini": (3072, 8192, 32, 32, 32, 96, 96, 32064, 131072, 4096, 1e4, 262144, False,
                   (1, 32000, 32000), 3_821_079_552),
    "phi4": (5120, 17920, 40, 40, 10, 128, 128, 100352, 16384, 16384, 250000.0, None, False,
             (100257, 100257, 100257), 14_659_507_200),
    "phi4_mini": (3072, 8192, 32, 24, 8, 128, 96, 200064, 131072, 4096, 1e4, 262144, True,
                  (199999, 199999, 199999), 3_836_021_760),
    "phi4_mini_reasoning": (3072, 8192, 32, 24, 8, 128, 96, 200064, 131072, 4096, 1e4, 262144,
                            True, (199999, 199999, 199999), 3_836_021_760),
}
LONGROPE = [n for n in SPEC if SPEC[n][8] > SPEC[n][9]]

# sqrt(1 + ln(131072 / 4096) / ln(4096)) = sqrt(1 + 5/12) = sqrt(17/12), the spec's figure.
MAGNITUDE_128K = 1.1902380714238083


def raw(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def test_fixture_set_is_the_spec_table():
    assert sorted(p.stem for p in FIXTURES.glob("*.json")) == sorted(SPEC)


@pytest.mark.parametrize("name", SPEC)
def test_from_hf_reads_the_spec_figures(name, tmp_path):
    H, I, L, nh, nkv, hd, rot, V, maxpos, orig, theta, window, tied, ids, _ = SPEC[name]
    config = Phi3Config.from_hf(FIXTURES / f"{name}.json")
    # A folder and the parsed dict give the same (frozen, hashable) config.
    (tmp_path / "config.json").write_text((FIXTURES / f"{name}.json").read_text())
    assert Phi3Config.from_hf(tmp_path) == config == Phi3Config.from_hf(raw(name))
    hash(config)
    got = (config.hidden_size, config.intermediate_size, config.num_hidden_layers,
           config.num_attention_heads, config.num_key_value_heads, config.head_dim,
           config.rotary_dim, config.vocab_size, config.max_position_embeddings,
           config.original_max_position_embeddings, config.rope_theta, config.sliding_window,
           config.tie_word_embeddings,
           (config.bos_token_id, config.eos_token_id[0], config.pad_token_id))
    assert got == (H, I, L, nh, nkv, hd, rot, V, maxpos, orig, theta, window, tied, ids)
    assert config.rms_norm_eps == 1e-5
    if name in LONGROPE:
        rs = raw(name)["rope_scaling"]
        assert config.rope_scaling.short_factor == tuple(rs["short_factor"])
        assert config.rope_scaling.long_factor == tuple(rs["long_factor"])
        assert len(config.rope_scaling.long_factor) == rot // 2
    else:
        assert config.rope_scaling is None


@pytest.mark.parametrize("name", SPEC)
def test_full_size_parameter_count_without_allocating(name):
    config = Phi3Config.from_hf(FIXTURES / f"{name}.json")
    _, state = abstract_model(config, "bfloat16")
    leaves = jax.tree.leaves(state)
    # Abstract shapes only: a 14B model would not fit this machine if it were allocated.
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert {x.dtype for x in leaves} == {np.dtype("bfloat16")}
    count = sum(math.prod(x.shape) for x in leaves)
    assert count == SPEC[name][-1]
    # The same count from the checkpoint's tensor table (what the loader reads) and by hand:
    # 2VH untied (VH tied) + L * (2H norms + qkv + o + gate_up + down) + H final norm.
    assert sum(math.prod(s.hf_shape) for s in tensor_specs(config)) == count
    H, I, L, nh, nkv, hd, *_ = SPEC[name]
    V, tied = SPEC[name][7], SPEC[name][12]
    per_layer = 2 * H + (nh + 2 * nkv) * hd * H + H * nh * hd + 2 * I * H + I * H
    assert count == (1 if tied else 2) * V * H + L * per_layer + H


@pytest.mark.parametrize("name,qkv,gate_up,embed", [
    ("phi3_mini_4k", (9216, 3072), (16384, 3072), (32064, 3072)),
    ("phi3_medium_4k", (7680, 5120), (35840, 5120), (32064, 5120)),
    ("phi4", (7680, 5120), (35840, 5120), (100352, 5120)),
    ("phi4_mini", (5120, 3072), (16384, 3072), (200064, 3072)),
])
def test_checkpoint_tensor_shapes_match_spec(name, qkv, gate_up, embed):
    """Spec section 5's concrete safetensors shapes (Phi-4-mini's read from real headers)."""
    specs = {s.hf_name: s.hf_shape for s in tensor_specs(Phi3Config.from_hf(raw(name)))}
    assert specs["model.layers.0.self_attn.qkv_proj.weight"] == qkv
    assert specs["model.layers.0.mlp.gate_up_proj.weight"] == gate_up
    assert specs["model.embed_tokens.weight"] == embed
    assert ("lm_head.weight" in specs) == (name != "phi4_mini")


def test_longrope_magnitude_factor():
    assert longrope_attention_factor(131072, 4096) == pytest.approx(MAGNITUDE_128K, rel=1e-15)
    assert math.sqrt(17 / 12) == pytest.approx(MAGNITUDE_128K, rel=1e-15)
    assert longrope_attention_factor(4096, 4096) == 1.0  # no extension, no scaling
    for name in LONGROPE:
        scale = Phi3Config.from_hf(raw(name)).rope_scaling.attention_factor
        assert scale == pytest.approx(MAGNITUDE_128K, rel=1e-15), name


@pytest.mark.parametrize("name", SPEC)
def test_rope_tables_match_transformers(name):
    """Inverse frequencies, magnitude factor and cos/sin tables against transformers' own RoPE,
    built from the same config.json, in both regimes and up to max_position_embeddings.

    Tolerances: torch's vectorised float32 power is not correctly rounded everywhere, so an
    occasional inv_freq entry may differ by one ulp there, two after the factor product and the
    reciprocal (each correctly rounded on both sides); cos/sin then differ by at most
    p * ulp(inv_freq) ~ 4e-5 at p = 128k for the mid-range frequency concerned, plus ~1.5e-7 of
    evaluation error. 1e-4 is the logits budget; an inv_freq computed with numpy's float32 power
    (one ulp off in a quarter of the entries, high frequencies included) gives 9e-3 at 128k.
    """
    transformers = pytest.importorskip("transformers")
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from phi3_jax.rope import rotary_tables

    hf = transformers.Phi3Config(**raw(name))
    config = Phi3Config.from_hf(raw(name))
    short, long = inverse_frequencies(config)
    kind = hf.rope_parameters["rope_type"]
    if kind == "default":
        assert config.rope_scaling is None
        ref_short, scale = Phi3RotaryEmbedding.compute_default_rope_parameters(hf, "cpu")
        ref_long = ref_short
    else:
        init = ROPE_INIT_FUNCTIONS[kind]
        ref_short, scale = init(hf, "cpu")
        ref_long, _ = init(hf, "cpu", seq_len=config.original_max_position_embeddings + 1)
    np.testing.assert_array_max_ulp(short, ref_short.numpy(), maxulp=2)
    np.testing.assert_array_max_ulp(long, ref_long.numpy(), maxulp=2)
    assert (1.0 if config.rope_scaling is None else config.rope_scaling.attention_factor
            ) == pytest.approx(scale, rel=1e-15)
    if name == "phi4_mini_reasoning":
        np.testing.assert_array_equal(short, long)  # short == long: one rotation
    elif config.rope_scaling is not None:
        assert not np.allclose(short, long)

    rotary = Phi3RotaryEmbedding(hf)
    orig, top = config.original_max_position_embeddings, config.max_position_embeddings
    for positions in (np.arange(orig - 1024, orig), np.arange(top - 1024, top)):
        ref_cos, ref_sin = rotary(torch.zeros(1), torch.from_numpy(positions)[None])
        is_long = np.array([positions[-1] + 1 > orig])
        cos, sin = rotary_tables(config, positions[None], is_long, np.float32)
        np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("legacy", ["su", "yarn"])
@pytest.mark.parametrize("key", ["type", "rope_type"])
def test_legacy_longrope_names(legacy, key):
    """transformers >= 4.43 reads "su" and "yarn" as "longrope" (sqrt magnitude); so do we."""
    modern = Phi3Config.from_hf(raw("phi3_mini_128k"))
    old = raw("phi3_mini_128k")
    old["rope_scaling"] = {k: v for k, v in old["rope_scaling"].items() if k != "type"}
    old["rope_scaling"][key] = legacy
    assert Phi3Config.from_hf(old) == modern
    # original_max may also sit inside the block. (transformers 5.x needs it there for "su":
    # it only moves the top-level value in for the types it knows before renaming "su".)
    old["rope_scaling"]["original_max_position_embeddings"] = 4096
    assert Phi3Config.from_hf(old) == modern
    transformers = pytest.importorskip("transformers")
    assert transformers.Phi3Config(**old).rope_parameters["rope_type"] == "longrope"


@pytest.mark.parametrize("name", SPEC)
def test_v5_rope_parameters_layout(name):
    """What transformers v5 writes (`rope_parameters` holding theta, partial rotary factor and
    original_max) parses to the same config as the v4 file."""
    transformers = pytest.importorskip("transformers")
    v5 = transformers.Phi3Config(**raw(name)).to_dict()
    assert "rope_parameters" in v5 and v5.get("rope_scaling") is None
    assert Phi3Config.from_hf(v5) == Phi3Config.from_hf(raw(name))


def test_v5_rope_parameters_only_inside():
    """A v5 config whose RoPE fields live only inside rope_parameters (no top-level copies)."""
    v4 = raw("phi4_mini")
    v5 = {k: v for k, v in v4.items() if k not in (
        "rope_scaling", "rope_theta", "partial_rotary_factor", "original_max_position_embeddings")}
    v5["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.75,
                             "original_max_position_embeddings": 4096,
                             **{k: v4["rope_scaling"][k] for k in ("short_factor", "long_factor")}}
    config = Phi3Config.from_hf(v5)
    assert config == Phi3Config.from_hf(v4)
    assert config.rotary_dim == 96
    # An explicit `factor` sets the magnitude (transformers v5's precedence over max / original).
    v5["rope_parameters"]["factor"] = 8.0
    assert Phi3Config.from_hf(v5).rope_scaling.attention_factor == pytest.approx(
        math.sqrt(1 + math.log(8) / math.log(4096)), rel=1e-15)
    # Default RoPE in the v5 layout keeps its theta (Phi-4's 250000).
    phi4 = {k: v for k, v in raw("phi4").items() if k not in ("rope_scaling", "rope_theta")}
    phi4["rope_parameters"] = {"rope_type": "default", "rope_theta": 250000.0}
    assert Phi3Config.from_hf(phi4) == Phi3Config.from_hf(raw("phi4"))


@pytest.mark.parametrize("name", SPEC)
def test_to_hf_round_trip(name):
    config = Phi3Config.from_hf(raw(name))
    assert Phi3Config.from_hf(config.to_hf()) == config
