"""Sharding over a device mesh, on 8 fake CPU devices (tests/conftest.py sets them up).

The reference for every sharded result is the same checkpoint run on one device. Tolerance:
fp32 with 1e-5 relative to the logits' scale. Sharding only reorders sums (a split vocab or F,
an all-reduce over `model`) and XLA's CPU kernels block differently per shape; either moves a
logit by a few fp32 ulps per layer (measured: <= 2.1e-5 on logits of magnitude ~7). A wrong
slice, group or missing reduction moves logits by O(1).
"""

from __future__ import annotations

import argparse
import re

import jax
import numpy as np
import pytest
from conftest import make_hf_checkpoint
from flax import nnx
from jax.sharding import PartitionSpec as P
from multihost_worker import greedy, prompts_for

import phi3_jax
from phi3_jax import sharding
from phi3_jax.cache import CacheUpdate, KVCache
from phi3_jax.config import Phi3Config
from phi3_jax.model import abstract_model
from phi3_jax.sharding import MeshError

# Tiny configs covering: every axis split (mha); KV heads that do not divide model=4 or 8 while
# the query heads do, with F and V that divide neither (gqa_nodiv); Phi-4-mini's shape, tied
# head, partial rotary, 2 KV heads for 6 query heads (tied).
CONFIGS = {
    "mha": dict(num_attention_heads=8, num_key_value_heads=8, hidden_size=64),
    "gqa_nodiv": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
                      intermediate_size=90, vocab_size=126),
    "tied": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=96,
                 partial_rotary_factor=0.75, tie_word_embeddings=True),
}
MESHES = ["data=8", "model=8", "data=2,model=4"]

PHI3_MEDIUM = Phi3Config(vocab_size=32064, hidden_size=5120, intermediate_size=17920,
                         num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
                         max_position_embeddings=4096)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    return {name: make_hf_checkpoint(root / name, seed=3, **kw) for name, kw in CONFIGS.items()}


@pytest.fixture(scope="module")
def single(checkpoints):
    """Single-device logits and greedy tokens: the reference."""
    out = {}
    for name, path in checkpoints.items():
        model = phi3_jax.load(path)
        ids, mask = _inputs(model.config.vocab_size)
        prompts = prompts_for(model.config.vocab_size, batch=8)
        out[name] = (np.asarray(model.logits(ids, mask)), greedy(model, prompts, steps=5))
    return out


def _inputs(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    # 8 rows (divides data=8 and data=2), left padding in two rows, long enough that RoPE
    # rotations are not near identity.
    ids = np.random.RandomState(0).randint(0, vocab, (8, 40))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    mask[6, :23] = 0
    return ids, mask


def _close(actual: np.ndarray, expected: np.ndarray) -> None:
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# ---------------------------------------------------------------------------- meshes

def test_mesh_spec_forms():
    for spec in ("data=2,model=4", {"data": 2, "model": 4}):
        mesh = sharding.make_mesh(spec)
        assert dict(mesh.shape) == {"data": 2, "model": 4}
        assert mesh.devices.size == 8 and len({d.id for d in mesh.devices.flat}) == 8
    assert sharding.make_mesh(mesh) is mesh
    assert dict(sharding.make_mesh("model=8").shape) == {"data": 1, "model": 8}
    assert dict(sharding.make_mesh(None).shape) == {"data": 1, "model": 8}


def test_mesh_errors_name_the_mismatch_and_options():
    with pytest.raises(MeshError) as e:
        sharding.make_mesh("data=3,model=4")
    msg = str(e.value)
    assert "needs 12 devices but 8 are available" in msg
    for option in ("data=1,model=8", "data=2,model=4", "data=8,model=1"):
        assert option in msg
    with pytest.raises(MeshError, match=r"expected e\.g\. 'data=2,model=4'"):
        sharding.make_mesh("data=2,model=four")
    with pytest.raises(MeshError, match="unknown mesh axes"):
        sharding.make_mesh("pipeline=2,model=4")


def test_cli_mesh_argument():
    parser = argparse.ArgumentParser()
    sharding.add_mesh_argument(parser)
    mesh = sharding.mesh_from_args(parser.parse_args(["--mesh", "data=2,model=4"]))
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    assert sharding.mesh_from_args(parser.parse_args([])) is None
    args = parser.parse_args(["--distributed", "--coordinator", "h:1", "--num-processes", "2",
                              "--process-id", "1"])
    assert (args.distributed, args.coordinator, args.num_processes, args.process_id) == (
        True, "h:1", 2, 1)


# ---------------------------------------------------------------------------- rules

def _specs(config: Phi3Config, mesh_spec: str) -> dict[str, P]:
    _, abstract = abstract_model(config)
    shardings = sharding.param_shardings(abstract, sharding.make_mesh(mesh_spec))
    return {".".join(map(str, path)): s.spec for path, s in nnx.to_flat_state(shardings)}


def test_rules_megatron_vocab_parallel():
    config = Phi3Config.from_hf({**_tiny(), **CONFIGS["mha"]})
    specs = _specs(config, "data=2,model=4")
    layer = "model.layers.0."
    assert specs[layer + "self_attn.qkv_proj.weight"] == P(None, "model", None, None)  # K
    assert specs[layer + "self_attn.o_proj.weight"] == P("model", None, None)  # N
    assert specs[layer + "mlp.gate_up_proj.weight"] == P(None, None, "model")  # F
    assert specs[layer + "mlp.down_proj.weight"] == P("model", None)  # F
    assert specs["model.embed_tokens.weight"] == P("model", None)  # V
    assert specs["lm_head.weight"] == P("model", None)
    assert specs[layer + "input_layernorm.weight"] == P(None)


def test_heads_follow_kv_heads_phi3_medium():
    """10 KV heads: split on model=2; on model=4 and 8 attention is kept whole (qkv, o_proj and
    cache together, although 40 query heads would divide), while the MLP and vocab stay split."""
    qkv, o = "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    specs = _specs(PHI3_MEDIUM, "model=2,data=4")
    assert specs[qkv] == P(None, "model", None, None) and specs[o] == P("model", None, None)
    for mesh_spec in ("model=4,data=2", "model=8"):
        specs = _specs(PHI3_MEDIUM, mesh_spec)
        assert specs[qkv] == P(None, None, None, None) and specs[o] == P(None, None, None)
        assert specs["model.layers.0.mlp.down_proj.weight"] == P("model", None)
        assert specs["model.embed_tokens.weight"] == P("model", None)
        cache = sharding.cache_shardings(PHI3_MEDIUM, sharding.make_mesh(mesh_spec), rows=8)
        assert cache.k[0].spec[2] is None  # K kept whole, like the qkv weights
    cache = sharding.cache_shardings(PHI3_MEDIUM, sharding.make_mesh("data=4,model=2"), rows=8)
    assert cache.k[0].spec == P("data", None, "model", None)
    assert len(cache.k) == len(cache.v) == 40


def test_rules_refuse_two_names_on_one_mesh_axis():
    mesh = sharding.make_mesh("data=2,model=4")
    bad = {**sharding.RULES, "embed": "model"}
    with pytest.raises(MeshError, match="more than one dimension onto mesh axis 'model'"):
        sharding.partition_spec(("vocab", "embed"), (128, 64), mesh, bad)
    with pytest.raises(MeshError, match="no entry in the sharding rules"):
        sharding.partition_spec(("experts", "embed"), (4, 64), mesh)


def test_decode_step_keeps_the_cache_in_place_when_kv_heads_do_not_divide():
    """K=2 on model=4 with N=8, F and V split: with query heads following KV heads, a decode
    step communicates only by all-reduce. (Splitting o_proj on N alone made GSPMD all-gather
    the whole KV cache every step: the reason for FOLLOWS.)"""
    import jax.numpy as jnp

    from phi3_jax.model import Phi3ForCausalLM

    config = Phi3Config.from_hf({**_tiny(), "num_attention_heads": 8, "num_key_value_heads": 2,
                                 "num_hidden_layers": 1})
    mesh = sharding.make_mesh("data=2,model=4")
    graphdef, params = nnx.split(Phi3ForCausalLM(config, rngs=nnx.Rngs(0)))
    params = jax.device_put(params, sharding.param_shardings(params, mesh))
    cache_sh = sharding.cache_shardings(config, mesh, rows=2)
    cache = jax.jit(lambda: KVCache.init(config, 2, 64, jnp.float32), out_shardings=cache_sh)()
    tokens = sharding.shard_batch(np.zeros((2, 1), np.int32), mesh)

    def step(params, cache, tokens):
        update = CacheUpdate(starts=tokens[:, 0], read_len=64)
        logits, cache = nnx.merge(graphdef, params)(tokens, tokens, cache, update)
        return logits, cache

    hlo = jax.jit(step, out_shardings=(None, cache_sh)).lower(
        params, cache, tokens).compile().as_text()
    assert " all-reduce(" in hlo or " all-reduce-start(" in hlo  # MLP and embedding are split
    # The cache write is a scatter: GSPMD moves its indices ([B, 1, 2] int32) and the step's
    # new keys and values (B x K x H per layer) between devices; nothing the size of a cache
    # row (64 x K x H) or of the activations may move.
    moved = re.findall(r"= \w+\[([\d,]*)\][^=]* (all-gather|collective-permute|all-to-all)\(",
                       hlo)
    new_kv = 2 * config.num_key_value_heads * config.head_dim
    assert all(np.prod([int(d) for d in dims.split(",") if d]) <= new_kv
               for dims, _ in moved), moved


# ---------------------------------------------------------------------------- loading

def test_load_puts_only_its_slice_on_each_device(checkpoints):
    path = checkpoints["mha"]
    full = phi3_jax.load(path)
    model = phi3_jax.load(path, mesh="data=2,model=4")
    flat_full = dict(nnx.to_flat_state(full.params))
    split = 0
    for key, var in nnx.to_flat_state(model.params):
        array, reference = var.get_value(), np.asarray(flat_full[key].get_value())
        expected_shape = array.sharding.shard_shape(array.shape)
        assert len(array.addressable_shards) == 8
        for shard in array.addressable_shards:
            assert shard.data.shape == expected_shape
            np.testing.assert_array_equal(np.asarray(shard.data), reference[shard.index])
        split += expected_shape != array.shape
    assert split == 4 * 2 + 2  # qkv, o, gate_up, down in each of 2 layers; embed, head
    embed = model.params["model"]["embed_tokens"]["weight"].get_value()
    assert {s.data.shape for s in embed.addressable_shards} == {(32, 64)}  # V / 4


def test_orbax_restores_straight_onto_the_mesh(checkpoints, tmp_path):
    """A converted checkpoint restores each parameter into its sharding, with the same values
    on every shard as the Hugging Face folder gives."""
    hf_to_orbax = pytest.importorskip("convert.hf_to_orbax")
    path = checkpoints["tied"]
    hf_to_orbax.convert(path, tmp_path / "orbax", progress=False)
    mesh = sharding.make_mesh("data=2,model=4")
    restored = phi3_jax.load(tmp_path / "orbax", mesh=mesh)
    expected = dict(nnx.to_flat_state(sharding.param_shardings(restored.params, mesh)))
    reference = dict(nnx.to_flat_state(phi3_jax.load(path).params))
    for key, var in nnx.to_flat_state(restored.params):
        array = var.get_value()
        assert array.sharding.spec == expected[key].spec
        for shard in array.addressable_shards:
            assert shard.data.shape == array.sharding.shard_shape(array.shape)
            np.testing.assert_array_equal(np.asarray(shard.data),
                                          np.asarray(reference[key].get_value())[shard.index])
    embed = restored.params["model"]["embed_tokens"]["weight"].get_value()
    assert {s.data.shape for s in embed.addressable_shards} == {(32, 96)}  # V / 4, tied head


# ---------------------------------------------------------------------------- parity

@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_logits_and_greedy_match_single_device(checkpoints, single, name, mesh_spec):
    model = phi3_jax.load(checkpoints[name], mesh=mesh_spec)
    ref_logits, ref_tokens = single[name]
    ids, mask = _inputs(model.config.vocab_size)
    logits = model.logits(ids, mask)
    if "data=" in mesh_spec:
        assert logits.sharding.spec[0] == "data"  # the batch really is split
    keep = mask.astype(bool)
    _close(np.asarray(logits)[keep], ref_logits[keep])
    tokens = greedy(model, prompts_for(model.config.vocab_size, batch=8), steps=5)
    assert tokens == ref_tokens


@pytest.mark.parametrize("name", ["mha", "gqa_nodiv"])
def test_sharded_blocked_prefill_matches_single_device(checkpoints, single, name,
                                                       force_blocked):
    """The blocked prefill attention (forced here with 4-token blocks) partitions like the
    reference: KV heads split over model (mha) or kept whole (gqa_nodiv), batch over data."""
    calls = force_blocked(4)
    model = phi3_jax.load(checkpoints[name], mesh="data=2,model=4")
    tokens = greedy(model, prompts_for(model.config.vocab_size, batch=8), steps=5)
    assert calls and set(calls) == {4}
    assert tokens == single[name][1]


# ---------------------------------------------------------------------------- errors

def test_batch_that_does_not_divide_data_is_refused_or_padded(checkpoints):
    mesh = sharding.make_mesh("data=2,model=4")
    config = Phi3Config.from_hf(checkpoints["mha"])
    with pytest.raises(MeshError) as e:
        sharding.check_mesh_fits(config, mesh, batch=3)
    msg = str(e.value)
    assert "batch size 3 does not divide over the mesh's data axis (data=2)" in msg
    assert "multiple of 2 (e.g. 4)" in msg and "data=1,model=8" in msg
    assert "data=2,model=4" not in msg.split("divides 3:")[1]
    sharding.check_mesh_fits(config, mesh, batch=4)
    # logits pads such a batch to the data axis (as generate does) instead of refusing it.
    ids = np.arange(3, 15, dtype=np.int32).reshape(3, 4)
    sharded = np.asarray(phi3_jax.load(checkpoints["mha"], mesh=mesh).logits(ids))
    expected = np.asarray(phi3_jax.load(checkpoints["mha"]).logits(ids))
    np.testing.assert_allclose(sharded, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_strict_refuses_heads_that_do_not_divide():
    mesh = sharding.make_mesh("model=8")
    sharding.check_mesh_fits(PHI3_MEDIUM, mesh)  # default: attention replicated, no error
    with pytest.raises(MeshError) as e:
        sharding.check_mesh_fits(PHI3_MEDIUM, mesh, strict=True)
    msg = str(e.value)
    assert "kv_heads (10) does not divide over model=8" in msg
    assert "sizes that divide it: [1, 2, 5, 10]" in msg
    assert "heads (40)" not in msg  # divides; kept whole only because kv_heads is
    assert "split every one: data=4,model=2, data=8,model=1" in msg
    assert "kv_heads (10) does not divide over model=8" in sharding.describe(PHI3_MEDIUM, mesh)
    assert "heads (40) follows kv_heads" in sharding.describe(PHI3_MEDIUM, mesh)


# ---------------------------------------------------------------------------- memory

def test_bytes_per_device_by_hand():
    """gqa_nodiv on model=4: only F (90) and V (126) could split, and neither divides; K=2 does
    not either; so every device holds everything. On model=2 all of them split."""
    config = Phi3Config.from_hf({**_tiny(), **CONFIGS["gqa_nodiv"]})
    _, abstract = abstract_model(config, "bfloat16")
    total = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(abstract)) * 2
    mesh4 = sharding.make_mesh("model=4,data=2")
    assert sharding.bytes_per_device(abstract,
                                     sharding.param_shardings(abstract, mesh4)) == total
    D, F, V, K, G, H, L = 64, 90, 126, 2, 4, 8, 2
    norms = (2 * L + 1) * D
    split = L * (D * K * (G + 2) * H + K * G * H * D + 2 * D * F + F * D) + 2 * V * D
    mesh2 = sharding.make_mesh("model=2,data=4")
    assert total == 2 * (norms + split)
    assert sharding.bytes_per_device(
        abstract, sharding.param_shardings(abstract, mesh2)) == 2 * (norms + split // 2)
    cache = jax.eval_shape(lambda: KVCache.init(config, 4, 1024, np.dtype("bfloat16")))
    kv = 2 * L * 4 * 1024 * K * H * 2  # k and v, bf16
    got = sharding.bytes_per_device(cache, sharding.cache_shardings(cache, mesh2))
    # k and v: rows over data=4 and K over model=2.
    assert got == kv // 8

def _tiny() -> dict:
    from conftest import TINY

    return {**TINY, "model_type": "phi3"}
