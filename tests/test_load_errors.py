"""Bad input fails loudly, naming the culprit: config fields, tensors and their files, token ids.

Checkpoints here are written by phi3_jax itself (no torch needed); every expected message was
checked by hand against what a user would need to find the problem.
"""

import json
import pathlib
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cli_error

import phi3_jax
from phi3_jax.cli import main
from phi3_jax.config import ConfigError, Phi3Config
from phi3_jax.demo import save_random_checkpoint
from phi3_jax.embedded import MODEL_DIR
from phi3_jax.finite import NonFiniteError
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
    with pytest.raises(SafetensorsError, match=re.escape(
            f"{file}: header line 1, column 1: not valid UTF-8 (byte 0xff at offset 0)")):
        phi3_jax.load(checkpoint)


def test_header_length_beyond_the_file(checkpoint):
    file = checkpoint / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[:8] = (10 ** 7).to_bytes(8, "little")
    file.write_bytes(bytes(data))
    with pytest.raises(SafetensorsError, match=re.escape(
            f"{file}: corrupt or truncated header (claims 10000000 bytes, file has "
            f"{len(data)})")):
        phi3_jax.load(checkpoint)
    data[:8] = (10 ** 9).to_bytes(8, "little")  # past the format's 100 MB, whatever the file
    file.write_bytes(bytes(data))
    with pytest.raises(SafetensorsError, match=re.escape(
            f"{file}: header of 1000000000 bytes is larger than the format's limit of "
            f"100000000")):
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
            f"{file}: header entry for tensor 'model.norm.weight': 128 bytes for shape [33] F32 "
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


# ---- companion files (issue 15): each error names the file and the field ----

@pytest.mark.parametrize("index,message", [
    ({"weight_map": [["lm_head.weight", "model.safetensors"]]},
     "'weight_map' must be an object mapping tensor names to shard files, got an array"),
    ({"metadata": {}}, "'weight_map' must be an object mapping tensor names to shard files, got "
                       "null"),
    ([1], "expected a JSON object, got an array"),
    ({"weight_map": {"lm_head.weight": 3}}, "weight_map entry 'lm_head.weight' must be a file "
                                            "name, got a number"),
])
def test_malformed_index(checkpoint, capsys, index, message):
    shard(checkpoint)
    (checkpoint / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        phi3_jax.load(checkpoint)
    assert str(e.value) == f"{checkpoint / INDEX_FILE}: {message}"
    assert message in cli_error(capsys, "convert", str(checkpoint), str(checkpoint.parent / "o"))


def test_index_with_bad_bytes(checkpoint):
    shard(checkpoint)
    index = checkpoint / INDEX_FILE
    index.write_bytes(index.read_bytes().replace(b"model.norm", b"model.n\xf6rm"))
    with pytest.raises(CheckpointError, match=re.escape(f"{index} line ") + r"\d+, column \d+: "
                                              r"not valid UTF-8 \(byte 0xf6 at offset \d+\)"):
        phi3_jax.load(checkpoint)


@pytest.mark.parametrize("content,message", [
    ('{"do_sample": true, "temperature": "hot"}',
     "field 'temperature' must be a number >= 0 or null, got 'hot'"),
    ('{"do_sample": "yes"}', "field 'do_sample' must be true, false or null, got 'yes'"),
    ('{"top_k": -1}', "field 'top_k' must be an integer >= 0 or null, got -1"),
    ('{"top_p": 1.5}', "field 'top_p' must be a number in [0, 1] or null, got 1.5"),
    ('{"max_new_tokens": 3e9}', "field 'max_new_tokens' must be a positive integer or null, got "
                                "3000000000.0"),
    ('{"repetition_penalty": NaN}', "field 'repetition_penalty' must be a number > 0 or null, "
                                    "got nan"),
    ('{"eos_token_id": "abc"}', "field 'eos_token_id' holds 'abc', which is not a token id (an "
                                "integer in [0, vocab_size = 64))"),
    ('{"eos_token_id": [2, 1099511627776]}', "field 'eos_token_id' holds 1099511627776, which "
                                             "is not a token id (an integer in [0, vocab_size = "
                                             "64))"),
    ('{"pad_token_id": [0]}', "field 'pad_token_id' holds [0], which is not a token id (an "
                              "integer in [0, vocab_size = 64))"),
    ("[2]", "expected a JSON object, got an array"),
    ('{"eos_token_id": 2,}', "not valid JSON (Expecting property name enclosed in double quotes "
                             "at line 1 column 20)"),
])
def test_malformed_generation_config(checkpoint, capsys, content, message):
    (checkpoint / "generation_config.json").write_text(content)
    with pytest.raises(ConfigError) as e:
        phi3_jax.load(checkpoint)
    assert str(e.value) == f"{checkpoint / 'generation_config.json'}: {message}"
    assert message in cli_error(capsys, "generate", "--model", str(checkpoint), "--prompt", "x")


@pytest.fixture
def with_tokenizer(tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(MODEL_DIR, tmp_path / "model"))


@pytest.mark.parametrize("change,message", [
    ({"added_tokens_decoder": {"320": {"special": True}}},
     "added_tokens_decoder['320']: expected an object with a string \"content\""),
    ({"added_tokens_decoder": {"x": {"content": "<|x|>"}}},
     "added_tokens_decoder['x']: id 'x' is not a non-negative integer"),
    ({"added_tokens_decoder": {"320": {"content": "<|x|>", "rstrip": "yes"}}},
     "added_tokens_decoder['320']: 'rstrip' must be true or false, got 'yes'"),
    ({"added_tokens_decoder": []}, "'added_tokens_decoder' must be an object, got an array"),
    ({"bos_token": 5}, "field 'bos_token' must be a token string (or an object with its "
                       "\"content\"), got 5"),
    ({"legacy": "yes"}, "field 'legacy' must be true or false, got 'yes'"),
    ({"chat_template": 7}, "'chat_template' must be a string, got a number"),
    ({"chat_template": [{"name": "default"}]}, "'chat_template' must be a string or a list of"),
])
def test_malformed_tokenizer_config(with_tokenizer, capsys, change, message):
    file = with_tokenizer / "tokenizer_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **change}))
    with pytest.raises(ValueError) as e:
        phi3_jax.load(with_tokenizer)
    assert str(e.value).startswith(f"{file}") and message in str(e.value), str(e.value)
    assert message in cli_error(capsys, "generate", "--model", str(with_tokenizer), "--prompt",
                                "1+1=")


def test_tokenizer_config_not_json(with_tokenizer):
    file = with_tokenizer / "tokenizer_config.json"
    file.write_bytes(b"\xef\xbb\xbf{]")
    with pytest.raises(ValueError, match=re.escape(f"{file}: not valid JSON (Expecting property "
                                                   f"name enclosed in double quotes")):
        phi3_jax.load(with_tokenizer)


def test_added_tokens_json_with_a_bad_id(with_tokenizer):
    (with_tokenizer / "added_tokens.json").write_text('{"<|x|>": "320"}')
    with pytest.raises(ValueError, match=re.escape(
            f"{with_tokenizer / 'added_tokens.json'} entry '<|x|>': id '320' is not a "
            f"non-negative integer")):
        phi3_jax.load(with_tokenizer)


# ---- non-finite weights (issue 15) ----

NORM = "model.norm.weight"


def poison(path: pathlib.Path, name: str = NORM, value: float = np.nan, at: int = 5) -> None:
    tensors = tensors_of(path)
    tensors[name].reshape(-1)[at] = value
    rewrite(path, tensors)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_weight_is_refused_by_name(tmp_path, dtype, value):
    path = pathlib.Path(save_random_checkpoint(tmp_path / "ckpt", SMALL, seed=0))
    tensors = {n: a.astype(np.dtype(jnp.dtype(dtype))) for n, a in tensors_of(path).items()}
    tensors[DOWN1][7, 9] = value
    rewrite(path, tensors)
    with pytest.raises(NonFiniteError) as e:
        phi3_jax.load(path)
    assert str(e.value) == (f"{path / 'model.safetensors'}: tensor '{DOWN1}' holds NaN or "
                            f"infinite values (first: {tensors[DOWN1][7, 9]} at index [7, 9]); "
                            f"pass allow_nonfinite=True (--allow-nonfinite) to load anyway")
    model = phi3_jax.load(path, allow_nonfinite=True)
    down = np.asarray(model.params["model"]["layers"][1]["mlp"]["down_proj"]["weight"])
    assert np.isnan(value) == np.isnan(down[9, 7]) and np.isinf(value) == np.isinf(down[9, 7])


def test_a_finite_check_past_the_first_chunk(tmp_path, monkeypatch):
    """The check walks a tensor in chunks: a NaN in a later chunk is found and placed exactly."""
    from phi3_jax import finite

    monkeypatch.setattr(finite, "CHUNK", 100)  # the [64, 32] embedding spans 21 chunks
    path = pathlib.Path(save_random_checkpoint(tmp_path / "ckpt", SMALL, seed=0))
    poison(path, "model.embed_tokens.weight", np.inf, at=64 * 32 - 1)
    with pytest.raises(NonFiniteError, match=r"'model.embed_tokens.weight' holds NaN or infinite "
                                             r"values \(first: inf at index \[63, 31\]\)"):
        phi3_jax.load(path)


def test_nonfinite_weights_through_convert_load_and_export(checkpoint, tmp_path, capsys):
    poison(checkpoint)
    orbax, hf = tmp_path / "orbax", tmp_path / "hf"
    err = cli_error(capsys, "convert", str(checkpoint), str(orbax), "--quiet")
    assert f"tensor '{NORM}' holds NaN or infinite values" in err and not orbax.exists()
    assert main(["convert", str(checkpoint), str(orbax), "--quiet", "--allow-nonfinite"]) == 0
    capsys.readouterr()
    # Orbax restores onto devices and is checked there, one reduction per array.
    with pytest.raises(NonFiniteError, match=re.escape(
            f"{orbax}: parameter '{NORM}' holds NaN or infinite values; pass allow_nonfinite")):
        phi3_jax.load(orbax)
    assert np.isnan(np.asarray(phi3_jax.load(orbax, allow_nonfinite=True)
                               .params["model"]["norm"]["weight"])[5])
    err = cli_error(capsys, "export", str(orbax), str(hf), "--quiet")
    assert f"{orbax / 'params'}: tensor '{NORM}' holds NaN or infinite values (first: nan at " \
           f"index [5])" in err
    assert not hf.exists()
    assert main(["export", str(orbax), str(hf), "--quiet", "--allow-nonfinite"]) == 0
    assert np.isnan(tensors_of(hf)[NORM][5])


@pytest.mark.parametrize("command", ["generate", "chat", "finetune"])
def test_allow_nonfinite_reaches_the_loader(checkpoint, tmp_path, capsys, monkeypatch, command):
    """generate, chat and finetune refuse a poisoned model in one line; --allow-nonfinite is
    passed to load (a stand-in loader reports what it got, so nothing compiles)."""
    import phi3_jax.generate_cli
    import phi3_jax.train.trainer

    poison(checkpoint)
    extra = {"generate": ["--prompt", "x"], "chat": [],
             "finetune": ["--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")]}
    argv = [command, "--model", str(checkpoint), *extra[command]]
    assert f"tensor '{NORM}' holds NaN" in cli_error(capsys, *argv)

    def stand_in(*args, **kwargs):
        raise ValueError(f"loader called with allow_nonfinite={kwargs.get('allow_nonfinite')}")

    module = phi3_jax.train.trainer if command == "finetune" else phi3_jax.generate_cli
    monkeypatch.setattr(module, "load", stand_in)
    assert "allow_nonfinite=True" in cli_error(capsys, *argv, "--allow-nonfinite")


def test_device_check_is_exact_when_a_finite_sum_overflows():
    """The device check sums in float32; finite weights whose sum overflows are rechecked
    element by element, not refused."""
    from phi3_jax import finite

    huge = jnp.full((1000,), 3e38, jnp.float32)
    finite.check_on_device([huge, -huge], ["a", "b"], "ckpt")
    with pytest.raises(NonFiniteError, match=r"^ckpt: parameters 'b', 'c' hold NaN or infinite"):
        finite.check_on_device([huge, huge.at[9].set(jnp.nan), huge.at[0].set(-jnp.inf)],
                               ["a", "b", "c"], "ckpt")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_weight_that_overflows_the_load_dtype_is_refused(checkpoint):
    """The check sees what was loaded: a finite float32 weight past float16's range (65504)
    would be infinite in a float16 model."""
    poison(checkpoint, value=1e6)
    phi3_jax.load(checkpoint)  # finite in float32
    with pytest.raises(NonFiniteError, match=re.escape(
            f"{checkpoint}: tensor '{NORM}' is finite in the checkpoint but overflows float16; "
            f"load it in a wider dtype")):
        phi3_jax.load(checkpoint, dtype="float16")
