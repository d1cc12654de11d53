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

from phi3_jax.config import Phi3Config, longrope_attention_factor
from phi3_jax.hf_weights import tensor_specs
from phi3_jax.model import abstract_model
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


# ---- every field's type and range, named in the error (issue 15) ----

V = "(an integer in [0, vocab_size = 32064))"
# (fixture, {field: value} to set; a dotted key sets inside rope_scaling; None deletes), message
BAD_FIELDS = [
    # the probe's examples
    ("phi3_mini_4k", {"hidden_size": "128"}, "'hidden_size' must be a positive integer, got '128'"),
    ("phi3_mini_4k", {"num_attention_heads": 0},
     "'num_attention_heads' must be a positive integer, got 0"),
    ("phi3_mini_4k", {"num_attention_heads": "4"},
     "'num_attention_heads' must be a positive integer, got '4'"),
    ("phi3_mini_4k", {"rms_norm_eps": None}, "'rms_norm_eps' must be a positive number, got None"),
    ("phi3_mini_4k", {"rms_norm_eps": "abc"},
     "'rms_norm_eps' must be a positive number, got 'abc'"),
    ("phi3_mini_4k", {"rope_theta": [1, 2]}, "'rope_theta' must be a positive number, got [1, 2]"),
    ("phi3_mini_128k", {"original_max_position_embeddings": 0},
     "'original_max_position_embeddings' must be an integer >= 2, got 0"),
    ("phi3_mini_128k", {"original_max_position_embeddings": 1},
     "'original_max_position_embeddings' must be an integer >= 2, got 1"),
    ("phi3_mini_128k", {"rope_scaling.factor": "2"},
     "'rope_scaling.factor' must be a positive number, got '2'"),
    ("phi3_mini_128k", {"rope_scaling.short_factor": [1.0] * 47 + [None]},
     "'rope_scaling.short_factor' must hold positive finite numbers; entry 47 is None"),
    ("phi3_mini_128k", {"rope_scaling.long_factor": ["1.0"] * 48},
     "'rope_scaling.long_factor' must hold positive finite numbers; entry 0 is '1.0'"),
    ("phi3_mini_4k", {"eos_token_id": "abc"}, f"'eos_token_id' holds 'abc', which is not a token "
                                              f"id {V}"),
    ("phi3_mini_4k", {"eos_token_id": 2**40},
     f"'eos_token_id' holds 1099511627776, which is not a token id {V}"),
    # the same classes, other fields and values
    ("phi3_mini_4k", {"vocab_size": True}, "'vocab_size' must be a positive integer, got True"),
    ("phi3_mini_4k", {"num_hidden_layers": 32.0},
     "'num_hidden_layers' must be a positive integer, got 32.0"),
    ("phi3_mini_4k", {"num_key_value_heads": 0},
     "'num_key_value_heads' must be a positive integer, got 0"),
    ("phi3_mini_4k", {"max_position_embeddings": 2**40},
     "'max_position_embeddings' is 1099511627776, more than phi3-jax supports (2147483647)"),
    ("phi3_mini_4k", {"intermediate_size": -8192},
     "'intermediate_size' must be a positive integer, got -8192"),
    ("phi3_mini_4k", {"head_dim": "96"}, "'head_dim' ('96') must equal hidden_size"),
    ("phi3_mini_4k", {"sliding_window": "2047"},
     "'sliding_window' must be a positive integer, got '2047'"),
    ("phi3_mini_4k", {"sliding_window": 0}, "'sliding_window' must be a positive integer, got 0"),
    ("phi3_mini_4k", {"rms_norm_eps": float("nan")},
     "'rms_norm_eps' must be a positive number, got nan"),
    ("phi3_mini_4k", {"rope_theta": True}, "'rope_theta' must be a positive number, got True"),
    ("phi3_mini_4k", {"partial_rotary_factor": 1.5},
     "'partial_rotary_factor' must be a number in (0, 1.0], got 1.5"),
    ("phi3_mini_4k", {"partial_rotary_factor": "0.5"},
     "'partial_rotary_factor' must be a number in (0, 1.0], got '0.5'"),
    ("phi3_mini_4k", {"tie_word_embeddings": "false"},
     "'tie_word_embeddings' must be true or false, got 'false'"),
    ("phi3_mini_4k", {"attention_bias": "no"}, "'attention_bias' must be true or false, got 'no'"),
    ("phi3_mini_4k", {"bos_token_id": -1}, f"'bos_token_id' holds -1, which is not a token id {V}"),
    ("phi3_mini_4k", {"pad_token_id": 32064},
     f"'pad_token_id' holds 32064, which is not a token id {V}"),
    ("phi3_mini_4k", {"eos_token_id": [32000, None]},
     f"'eos_token_id' holds None, which is not a token id {V}"),
    ("phi3_mini_4k", {"eos_token_id": [32000, True]},
     f"'eos_token_id' holds True, which is not a token id {V}"),
    ("phi3_mini_4k", {"eos_token_id": {"id": 1}},
     f"'eos_token_id' holds {{'id': 1}}, which is not a token id {V}"),
    ("phi3_mini_4k", {"model_type": ["phi3"]}, "'model_type' is ['phi3'], which phi3-jax does not"),
    ("phi3_mini_4k", {"rope_scaling": "longrope"},
     "'rope_scaling' must be an object or null, got 'longrope'"),
    ("phi3_mini_128k", {"rope_scaling.type": ["longrope"]},
     "'rope_scaling.type' is ['longrope']; supported"),
    ("phi3_mini_128k", {"rope_scaling.long_factor": "1,2"},
     "'rope_scaling.long_factor' must be a list of numbers, got '1,2'"),
    ("phi3_mini_128k", {"rope_scaling.short_factor": [1.0] * 47 + [True]},
     "'rope_scaling.short_factor' must hold positive finite numbers; entry 47 is True"),
    ("phi3_mini_128k", {"rope_scaling.short_factor": [float("inf")] * 48},
     "'rope_scaling.short_factor' must hold positive finite numbers; entry 0 is inf"),
    ("phi3_mini_128k", {"rope_scaling.attention_factor": 0},
     "'rope_scaling.attention_factor' must be a positive number, got 0"),
    ("phi3_mini_128k", {"rope_scaling.factor": -2.0},
     "'rope_scaling.factor' must be a positive number, got -2.0"),
    ("phi3_mini_4k", {"original_max_position_embeddings": "4096"},
     "'original_max_position_embeddings' must be an integer >= 2, got '4096'"),
]


def _mutate(raw: dict, changes: dict) -> dict:
    for key, value in changes.items():
        target, key = (raw["rope_scaling"], key[13:]) if key.startswith("rope_scaling.") else (
            raw, key)
        target[key] = value
    return raw


@pytest.mark.parametrize("name,changes,message", BAD_FIELDS,
                         ids=[f"{k}={v!r:.20}" for _, c, _ in BAD_FIELDS for k, v in c.items()])
def test_bad_field_is_refused_by_name(name, changes, message):
    from phi3_jax.config import ConfigError

    with pytest.raises(ConfigError) as e:
        Phi3Config.from_hf(_mutate(raw(name), changes))
    assert str(e.value).startswith(f"config field {message}"), str(e.value)


def test_v5_layout_names_rope_parameters():
    from phi3_jax.config import ConfigError

    v5 = raw("phi3_mini_128k")
    v5["rope_parameters"] = {**v5.pop("rope_scaling"), "rope_type": "longrope", "factor": "2"}
    with pytest.raises(ConfigError, match=r"'rope_parameters.factor' must be a positive number"):
        Phi3Config.from_hf(v5)


@pytest.mark.parametrize("content,message", [
    ("[1, 2]", "expected a JSON object, got an array"),
    ('"phi3"', "expected a JSON object, got a string"),
    ('{"model_type": "phi3",', "not valid JSON (Expecting property name enclosed in double "
                               "quotes at line 1 column 23)"),
])
def test_config_file_that_is_not_an_object(tmp_path, content, message):
    from phi3_jax.config import ConfigError

    (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError) as e:
        Phi3Config.from_hf(tmp_path)
    assert str(e.value) == f"{tmp_path / 'config.json'}: {message}"


def test_token_id_rules():
    """Ids lie in [0, vocab_size). Without an eos_token_id, transformers' default 32000 is taken
    when the vocabulary holds it, and none otherwise; ints given for floats become floats."""
    base = {**raw("phi3_mini_4k"), "rope_theta": 10000, "rms_norm_eps": 1}
    del base["eos_token_id"]
    config = Phi3Config.from_hf(base)
    assert config.eos_token_id == (32000,)
    assert isinstance(config.rope_theta, float) and isinstance(config.rms_norm_eps, float)
    assert Phi3Config.from_hf({**base, "vocab_size": 32000, "pad_token_id": 0}).eos_token_id == ()
    assert Phi3Config.from_hf({**base, "eos_token_id": [32000, 32007]}).eos_token_id == (
        32000, 32007)
    assert Phi3Config.from_hf({**base, "eos_token_id": None}).eos_token_id == ()
