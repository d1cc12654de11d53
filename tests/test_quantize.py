"""Weight-only int8/int4 quantization (phi3_jax.quantize): the kernels against transformers on the
dequantized weights, a mesh against one device, Orbax round trips, QLoRA, the engine, bad input.

One tiny random checkpoint (GQA, untied head): D = 64, F = 128, N * H = 64, V = 128; int4 in
groups of 16, so every split axis of a data=2,model=4 mesh still divides into whole groups.
"""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import hf_model, make_hf_checkpoint
from jax.sharding import PartitionSpec as P

import phi3_jax
from convert import convert, export
from phi3_jax import orbax_checkpoint as ock
from phi3_jax import quantize
from phi3_jax.cli import main
from phi3_jax.hf_weights import write_hf_folder
from phi3_jax.train import FinetuneConfig, finetune

GROUP = 16
TOL = 1e-4  # fp32 max |diff| against transformers, as in test_parity
SHAPE = dict(intermediate_size=128, num_attention_heads=8, num_key_value_heads=4,
             tie_word_embeddings=False)
SCHEMES = [("int8", False), ("int4", True)]  # (scheme, embeddings quantized too)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("q") / "hf", seed=5, **SHAPE)


def _ids(batch: int = 2, length: int = 24) -> np.ndarray:
    return np.random.RandomState(0).randint(3, 127, (batch, length))


def _dequantized_folder(model: phi3_jax.Phi3, out) -> phi3_jax.Phi3:
    """The model's dequantized weights, in fp32, as a Hugging Face folder."""
    layouts = quantize.layouts(model.graphdef, model.params)
    dense = quantize.dequantize_params(jax.device_get(model.params.to_pure_dict()), layouts)
    write_hf_folder(out, model.config, dense, "float32")
    return out


def _hf_logits(path, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(path)(torch.tensor(ids)).logits.numpy()


def test_codes_layout_and_error_bound():
    """int4: byte r of a group holds row r (low nibble) and row r + g/2 (high), codes in
    [-7, 7]; both schemes within half a step of the weight, scales never clip."""
    w = np.random.RandomState(1).randn(64, 3, 5).astype(np.float32)
    layout = quantize.Layout("int4", GROUP, w.shape, ("embed", None, "mlp"), 1)
    packed, scale = quantize.quantize(w, layout)
    assert packed.shape == (4, 8, 3, 5) and packed.dtype == np.uint8
    low, high = (packed & 15).astype(int) - 8, (packed >> 4).astype(int) - 8
    codes = np.round(w.reshape(4, 16, 3, 5) / scale.astype(np.float32)[:, None])
    np.testing.assert_array_equal(low, codes[:, :8])
    np.testing.assert_array_equal(high, codes[:, 8:])
    assert np.abs(codes).max() <= 7
    for scheme, n_in in (("int4", 1), ("int8", 1), ("int8", 0)):
        layout = quantize.Layout(scheme, GROUP, w.shape[:2] if n_in == 0 else w.shape,
                                 ("vocab", "embed", "mlp")[:3 - (n_in == 0)], n_in)
        x = w[..., 0] if n_in == 0 else w
        q, s = quantize.quantize(x, layout)
        back = quantize.dequantize(q, s, layout)
        step = np.abs(x).max() / quantize.QMAX[scheme]  # the coarsest scale
        assert np.abs(back - x).max() <= 0.5 * step * 1.01


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_blocked_matmul_builds_no_full_size_weight(scheme):
    """A batch-1 projection's compiled temporaries stay far below the dense weight (fp32
    [1024, 2, 2048]: 16 MiB), and the product equals the dequantized weight's."""
    w = np.random.RandomState(3).randn(1024, 2, 2048).astype(np.float32)
    layout = quantize.Layout(scheme, 128, w.shape, ("embed", None, "mlp"), 1, "blocked")
    weight, scale = quantize.quantize(w, layout)
    x = jnp.asarray(np.random.RandomState(4).randn(1, 1, 1024), jnp.float32)
    f = jax.jit(lambda x, q, s: quantize.project("BTD,DCF->BTCF", x, q, s, layout))
    temp = f.lower(x, weight, scale).compile().memory_analysis().temp_size_in_bytes
    assert temp <= w.nbytes / 4
    dense = quantize.dequantize(weight, scale, layout).astype(np.float64)
    expected = np.einsum("BTD,DCF->BTCF", np.asarray(x, np.float64), dense)
    # fp32 sums of 1024 products: a few ulps of the largest output.
    assert np.abs(np.asarray(f(x, weight, scale)) - expected).max() <= 1e-6 * np.abs(expected).max()


@pytest.mark.parametrize("scheme,embeddings", SCHEMES)
def test_logits_equal_transformers_on_the_dequantized_weights(ckpt, tmp_path, scheme,
                                                              embeddings):
    model = phi3_jax.load(ckpt, quantize=scheme, group_size=GROUP,
                          quantize_embeddings=embeddings)
    assert model.kernels.quantized_matmul == "blocked"  # the CPU path
    ids = _ids()
    ours = np.asarray(model.logits(ids))
    theirs = _hf_logits(_dequantized_folder(model, tmp_path / "deq"), ids)
    assert np.abs(ours - theirs).max() <= TOL
    dense = np.asarray(phi3_jax.load(ckpt).logits(ids))
    assert np.abs(ours - dense).max() > 1e-4  # really quantized
    # model.embed gives the (dequantized) vectors the ids stand for: the same logits.
    embedded = np.asarray(model.logits(inputs_embeds=model.embed(ids)))
    assert np.abs(embedded - ours).max() <= 1e-6 * np.abs(ours).max()


def test_mesh_equals_one_device_and_scales_follow_their_weights(ckpt):
    one = phi3_jax.load(ckpt, quantize="int4", group_size=GROUP)
    mesh = phi3_jax.load(ckpt, quantize="int4", group_size=GROUP, mesh="data=2,model=4")
    assert mesh.kernels.quantized_matmul == "xla"
    mlp = mesh.params["model"]["layers"][0]["mlp"]
    # down [F/g, g/2, D] and its scale [F/g, D]: whole groups split over `model`.
    assert mlp["down_proj"]["weight"][...].sharding.spec == P("model", None, None)
    assert mlp["down_proj"]["scale"][...].sharding.spec == P("model", None)
    assert mlp["gate_up_proj"]["scale"][...].sharding.spec == P(None, None, "model")
    ids = _ids(batch=4)
    np.testing.assert_allclose(np.asarray(mesh.logits(ids)), np.asarray(one.logits(ids)),
                               rtol=1e-5, atol=1e-5)


def test_orbax_round_trip_is_bit_exact_and_exports_dequantized(ckpt, tmp_path, capsys):
    out = tmp_path / "orbax"
    assert main(["convert", str(ckpt), str(out), "--quantize", "int4", "--group-size",
                 str(GROUP), "--quantize-embeddings", "--quiet"]) == 0
    meta = json.loads((out / ock.MARKER).read_text())
    assert meta["quantization"] == {"scheme": "int4", "group_size": GROUP, "embeddings": True}
    stored = phi3_jax.load(out)
    direct = phi3_jax.load(ckpt, quantize="int4", group_size=GROUP, quantize_embeddings=True)
    assert stored.quantization == direct.quantization
    for a, b in zip(jax.tree.leaves(stored.params), jax.tree.leaves(direct.params), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # On a mesh straight from the checkpoint, too.
    sharded = phi3_jax.load(out, mesh="data=2,model=4")
    ids = _ids(batch=4)
    np.testing.assert_allclose(np.asarray(sharded.logits(ids)),
                               np.asarray(direct.logits(ids)), rtol=1e-5, atol=1e-5)
    # Export: dense weights (the checkpoint's fp32) that transformers loads.
    export(out, tmp_path / "hf", progress=False)
    assert np.abs(_hf_logits(tmp_path / "hf", ids) - np.asarray(direct.logits(ids))).max() <= TOL
    assert main(["export", str(out), str(tmp_path / "m.gguf")]) != 0
    assert "is quantized (int4); GGUF export needs dense weights" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()


def test_engine_generates_on_a_quantized_model(ckpt, tmp_path):
    model = phi3_jax.load(ckpt, quantize="int8")
    ref = hf_model(_dequantized_folder(model, tmp_path / "deq"))
    prompt = _ids(batch=1, length=20)[0].tolist()
    ids = torch.tensor([prompt])
    theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                          do_sample=False)[0, len(prompt):].tolist()
    if model.config.eos_token_id in theirs:  # transformers pads after the eos
        theirs = theirs[:theirs.index(model.config.eos_token_id) + 1]
    [ours] = model.generate([prompt], max_new_tokens=12)
    assert ours.token_ids == theirs


def test_qlora_trains_and_exports_a_folder_transformers_loads(ckpt, tmp_path):
    data = tmp_path / "train.jsonl"
    rs = np.random.RandomState(2)
    data.write_text("\n".join(json.dumps({"input_ids": rs.randint(3, 127, 24).tolist()})
                              for _ in range(8)) + "\n")
    config = FinetuneConfig(steps=3, batch_size=4, seq_len=24, learning_rate=1e-2,
                            warmup_steps=0, lora_rank=4, quantize="int4", group_size=GROUP)
    result = finetune(ckpt, data, tmp_path / "out", config, progress=False)
    assert result.losses[3] < result.losses[1]
    base = phi3_jax.load(ckpt, quantize="int4", group_size=GROUP)
    frozen = jax.device_get(result.frozen)
    # The frozen base is the quantized one, unchanged by training.
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(base.params.to_pure_dict()),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The export merges the adapters into the dequantized base: what training ran.
    from phi3_jax.train.step import build_model_spec

    spec, _, _ = build_model_spec(base.config, jnp.float32, lora=config.lora,
                                  quantization=base.quantization)
    ids = _ids()
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    adapted = spec.module(jax.device_get(result.state.params), frozen)
    ours = np.asarray(jax.jit(lambda i, p: adapted(i, p)[0])(ids, pos))
    assert np.abs(_hf_logits(tmp_path / "out", ids) - ours).max() <= TOL


def test_bad_input_names_the_culprit_and_writes_nothing(ckpt, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization scheme 'int3'"):
        phi3_jax.load(ckpt, quantize="int3")
    with pytest.raises(ValueError, match=re.escape("group size 48 does not divide the input "
                                                   "dimension 64 of model.layers.0.qkv_proj")):
        convert(ckpt, tmp_path / "g48", quantize="int4", group_size=48, progress=False)
    assert not (tmp_path / "g48").exists()
    q = tmp_path / "q"
    convert(ckpt, q, quantize="int8", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        convert(q, tmp_path / "twice", quantize="int4", progress=False)
    assert not (tmp_path / "twice").exists()
    with pytest.raises(ValueError, match="already quantized \\(int8"):
        phi3_jax.load(q, quantize="int4")
    with pytest.raises(ValueError, match="--quantize int4 needs LoRA"):
        finetune(ckpt, tmp_path / "none.jsonl", tmp_path / "ft",
                 FinetuneConfig(quantize="int4"), progress=False)
    assert not (tmp_path / "ft").exists()


def test_generate_cli_quantizes_the_embedded_model(capsys):
    from phi3_jax.embedded import MODEL_DIR

    question = "Solve 3x + 4 = 19."
    [expected] = phi3_jax.load(MODEL_DIR, quantize="int4").generate(
        [[{"role": "user", "content": question}]], max_new_tokens=8)
    assert expected.text == "x = 5"
    assert main(["generate", "--quantize", "int4", "--chat", "--prompt", question,
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected.text
