"""Bad input fails loudly, naming the culprit: config fields, tensors and their files, token ids.

Checkpoints here are written by phi3_jax itself (no torch needed); every expected message was
checked by hand against what a user would need to find the problem.
"""

import json
import pathlib
import re

import numpy as np
import pytest

import phi3_jax
from phi3_jax.config import ConfigError, Phi3Config
from phi3_jax.demo import save_random_checkpoint
from phi3_jax.hf_weights import INDEX_FILE, CheckpointError, tensor_specs, write_hf_tensors
from phi3_jax.safetensors_io import SafetensorsError, SafetensorsFile, write_safetensors

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "configs"
SMALL = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                   eos_token_id=(2,))
DOWN1 = "model.layers.1.mlp.down_proj.weight"


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture
def checkpoint(tmp_path) -> pathlib.Path:
    return pathlib.Path(save_random_checkpoint(tmp_path / "ckpt", SMALL, seed=0))


def tensors_of(path: pathlib.Path) -> dict[str, np.ndarray]:
    st = SafetensorsFile(path / "model.safetensors")
    return {name: np.array(st[name]) for name in st}


def rewrite(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})


def shard(path: pathlib.Path, max_shard_size: str = "8KB") -> list[str]:
    """Rewrites the single-file checkpoint at path as shards + index; returns the shard names."""
    tensors = tensors_of(path)
    (path / "model.safetensors").unlink()
    files = write_hf_tensors(path, list(tensors.items()), max_shard_size)
    assert files[-1] == INDEX_FILE and len(files) >= 3
    return files[:-1]


# ---- config.json ----

@pytest.mark.parametrize("model_type,what", [
    ("phi3small", "Phi-3-small"), ("phimoe", "Phi-3.5-MoE"), ("phi3_v", "Phi-3-vision")])
def test_unsupported_model_type(checkpoint, model_type, what):
    raw = json.loads((checkpoint / "config.json").read_text())
    raw["model_type"] = model_type
    (checkpoint / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        phi3_jax.load(checkpoint)
    message = str(e.value)
    assert message.startswith(f"config field 'model_type' is '{model_type}' ({what}")
    assert "which phi3-jax does not support; supported: phi3 (Phi-3-mini" in message


def test_missing_model_type_is_refused_too():
    raw = fixture("phi3_mini_4k")
    del raw["model_type"]
    with pytest.raises(ConfigError, match=r"'model_type' is None, .* supported: phi3"):
        Phi3Config.from_hf(raw)


@pytest.mark.parametrize("field", ["short_factor", "long_factor"])
def test_factor_list_of_wrong_length(field):
    raw = fixture("phi3_mini_128k")
    raw["rope_scaling"][field] = raw["rope_scaling"][field][:-1]
    with pytest.raises(ConfigError) as e:
        Phi3Config.from_hf(raw)
    assert str(e.value) == (
        f"config field 'rope_scaling.{field}' has 47 entries; it must have rotary_dim // 2 = 48 "
        f"(head_dim 96 x partial_rotary_factor 1.0 / 2)")


def test_factor_list_sized_for_full_head_with_partial_rotary():
    """Phi-4-mini rotates 96 of 128 dims: 64-entry lists (head_dim / 2) are wrong."""
    raw = fixture("phi4_mini")
    raw["rope_scaling"]["long_factor"] = [1.0] * 64
    with pytest.raises(ConfigError, match=re.escape(
            "'rope_scaling.long_factor' has 64 entries; it must have rotary_dim // 2 = 48 "
            "(head_dim 128 x partial_rotary_factor 0.75 / 2)")):
        Phi3Config.from_hf(raw)


def test_factor_list_error_names_the_v5_key():
    """In a transformers v5 config.json the lists live in `rope_parameters`: name that key."""
    raw = fixture("phi3_mini_128k")
    rope = raw.pop("rope_scaling")
    raw["rope_parameters"] = {**rope, "rope_type": "longrope", "short_factor": [1.0] * 50}
    with pytest.raises(ConfigError, match=re.escape(
            "config field 'rope_parameters.short_factor' has 50 entries; it must have "
            "rotary_dim // 2 = 48")):
        Phi3Config.from_hf(raw)


# ---- tensors ----

def test_missing_tensor(checkpoint):
    tensors = tensors_of(checkpoint)
    del tensors[DOWN1]
    rewrite(checkpoint, tensors)
    with pytest.raises(CheckpointError) as e:
        phi3_jax.load(checkpoint)
    assert str(e.value) == (f"tensor '{DOWN1}' is missing from {checkpoint} "
                            f"(looked in model.safetensors)")


def test_extra_tensor(checkpoint):
    tensors = tensors_of(checkpoint)
    tensors["model.layers.2.mlp.down_proj.weight"] = tensors[DOWN1]  # a third layer
    rewrite(checkpoint, tensors)
    with pytest.raises(CheckpointError) as e:
        phi3_jax.load(checkpoint)
    assert str(e.value) == ("unexpected tensor 'model.layers.2.mlp.down_proj.weight' in "
                            "model.safetensors: not part of a Phi3ForCausalLM with this "
                            "config.json")


def test_wrongly_shaped_tensor(checkpoint):
    tensors = tensors_of(checkpoint)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    tensors[qkv] = tensors[qkv][:-8]  # as if one KV head fewer
    rewrite(checkpoint, tensors)
    with pytest.raises(CheckpointError) as e:
        phi3_jax.load(checkpoint)
    # (N + 2K) H = (4 + 4) * 8 = 64 rows of D = 32.
    assert str(e.value) == (f"tensor '{qkv}' in model.safetensors has shape [56, 32]; "
                            f"config.json implies [64, 32]")


def test_wrongly_shaped_tensor_names_its_shard(checkpoint):
    shards = shard(checkpoint)
    index = json.loads((checkpoint / INDEX_FILE).read_text())["weight_map"]
    file = index[DOWN1]
    st = SafetensorsFile(checkpoint / file)
    tensors = {n: np.array(st[n]) for n in st}
    tensors[DOWN1] = tensors[DOWN1].T.copy()  # [F, D] saved where HF stores [D, F]
    del st
    write_safetensors(checkpoint / file, tensors, {"format": "pt"})
    assert file in shards
    with pytest.raises(CheckpointError, match=re.escape(
            f"tensor '{DOWN1}' in {file} has shape [48, 32]; config.json implies [32, 48]")):
        phi3_jax.load(checkpoint)


def test_tensor_listed_in_index_but_absent_from_its_shard(checkpoint):
    shard(checkpoint)
    index = json.loads((checkpoint / INDEX_FILE).read_text())["weight_map"]
    file = index[DOWN1]
    st = SafetensorsFile(checkpoint / file)
    tensors = {n: np.array(st[n]) for n in st if n != DOWN1}
    del st
    write_safetensors(checkpoint / file, tensors, {"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        phi3_jax.load(checkpoint)
    assert str(e.value) == f"tensor '{DOWN1}' is listed in {INDEX_FILE} but missing from {file}"


def test_missing_shard(checkpoint):
    shards = shard(checkpoint)
    (checkpoint / shards[1]).unlink()
    with pytest.raises(CheckpointError) as e:
        phi3_jax.load(checkpoint)
    assert str(e.value) == (f"shard {shards[1]} listed in {INDEX_FILE} is missing from "
                            f"{checkpoint}")


def test_no_weights_at_all(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=re.escape(
            f"{checkpoint} has neither model.safetensors nor {INDEX_FILE}")):
        phi3_jax.load(checkpoint)


def test_tied_config_ignores_a_saved_lm_head(tmp_path):
    """Not an error: transformers also drops lm_head.weight when the config ties the head."""
    tied = Phi3Config(**{**SMALL.__dict__, "tie_word_embeddings": True})
    path = pathlib.Path(save_random_checkpoint(tmp_path / "tied", tied, seed=0))
    tensors = tensors_of(path)
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] * 2
    rewrite(path, tensors)
    model = phi3_jax.load(path)
    np.testing.assert_array_equal(np.asarray(model.params["model"]["embed_tokens"]["weight"]),
                                  tensors["model.embed_tokens.weight"])


# ---- safetensors files ----

def test_truncated_file(checkpoint):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-100])
    with pytest.raises(SafetensorsError) as e:
        phi3_jax.load(checkpoint)
    # The last tensor written is lm_head.weight: [64, 32] float32 = 8192 bytes at the end.
    total = sum(int(np.prod(s.hf_shape)) * 4 for s in tensor_specs(SMALL))
    assert str(e.value) == (f"{file}: truncated: tensor 'lm_head.weight' ends at byte {total} "
                            f"of a {total - 100}-byte data section")


def test_file_shorter_than_its_header_length(checkpoint):
    file = checkpoint / "model.safetensors"
    file.write_bytes(file.read_bytes()[:5])
    with pytest.raises(SafetensorsError, match=re.escape(f"{file}: truncated (no header length)")):
        phi3_jax.load(checkpoint)


def test_corrupt_header(checkpoint):
    file = checkpoint / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:16] = b"\xff\xfe garbage"[:8]  # the JSON header's first bytes
    file.write_bytes(bytes(data))
    with pytest.raises(SafetensorsError, match=re.escape(f"{file}: corrupt header (")):
        phi3_jax.load(checkpoint)


def test_header_length_beyond_the_file(checkpoint):
    file = checkpoint / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[:8] = (10 ** 9).to_bytes(8, "little")
    file.write_bytes(bytes(data))
    with pytest.raises(SafetensorsError, match=re.escape(
            f"{file}: corrupt or truncated header (claims 1000000000 bytes, file has "
            f"{len(data)})")):
        phi3_jax.load(checkpoint)


def test_tensor_byte_range_inconsistent_with_shape(checkpoint):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + n])
    header["model.norm.weight"]["shape"] = [33]  # 132 bytes claimed, 128 stored
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(blob) == n
    file.write_bytes(data[:8] + blob + data[8 + n:])
    with pytest.raises(SafetensorsError, match=re.escape(
            f"{file}: tensor 'model.norm.weight' has 128 bytes for shape (33,) F32 "
            f"(132 expected)")):
        phi3_jax.load(checkpoint)


# ---- token ids ----

@pytest.fixture
def model(checkpoint):
    return phi3_jax.load(checkpoint)


@pytest.mark.parametrize("bad,shown", [(-1, "[-1]"), (64, "[64]"), (10 ** 6, "[1000000]")])
def test_token_ids_outside_the_vocabulary(model, bad, shown):
    ids = [[1, 5, bad, 7]]
    with pytest.raises(ValueError) as e:
        model.logits(ids)
    assert str(e.value) == f"token ids {shown} are outside the vocabulary [0, 64)"


def test_token_id_errors_list_all_offenders(model):
    with pytest.raises(ValueError, match=re.escape(
            "token ids [-3, 64, 65] are outside the vocabulary [0, 64)")):
        model.logits([[65, 1, -3], [64, 2, 3]])


def test_padding_ids_are_not_checked(model):
    """Under attention_mask 0 an id is not a token (pad ids such as -100 are common)."""
    logits = model.logits([[-100, 1, 2], [3, 4, 5]], attention_mask=[[0, 1, 1], [1, 1, 1]])
    assert np.isfinite(np.asarray(logits)[:, 1:]).all()


@pytest.mark.parametrize("ids,message", [
    ([1, 2, 3], "input_ids must be [batch, length] with length >= 1, got shape (3,)"),
    ([[]], "input_ids must be [batch, length] with length >= 1, got shape (1, 0)"),
    ([[1.0, 2.0]], "input_ids must be integers, got float64"),
])
def test_malformed_input_ids(model, ids, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model.logits(ids)


def test_prompt_longer_than_max_position_embeddings(model):
    with pytest.raises(ValueError, match=re.escape(
            "a row has 129 tokens, more than the model's max_position_embeddings (128)")):
        model.logits(np.ones((1, 129), np.int32))
