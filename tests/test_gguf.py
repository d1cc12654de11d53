"""GGUF in and out without llama.cpp: round trips through our own writer and reader, tokenizers
against the `tokenizers` library and sentencepiece, Modelfiles, the Ollama store and bad input.
(tests/test_gguf_llamacpp.py checks both directions against llama.cpp's converter and runtime.)
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

import gguf
from gguf_fixtures import (
    END,
    ENDOFTEXT,
    TEXTS,
    leftovers,
    make_phi3_model,
    make_phi4_model,
    ollama_store,
    rewrite_gguf,
    set_tensor_type,
)

import phi3_jax
from phi3_jax import cli
from phi3_jax.gguf import export_gguf
from phi3_jax.gguf.vocab import CL100K, O200K

PHI4_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '<|im_sep|>' + "
    "message['content'] + '<|im_end|>'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}")
PHI4_MINI_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + "
    "'<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}"
    "{% else %}{{ eos_token }}{% endif %}")
PHI4_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>")
PHI4_MINI_TOKENS = ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>",
                    "<|tool|>", "<|/tool|>")
IDS = [[5, 17, 300, 42, 7, 99, 100, 101, 250, 3, 480, 12]]


@pytest.fixture(scope="module")
def phi3_hf(tmp_path_factory):
    """A GQA Phi-3 checkpoint with LongRoPE and a Phi-3 tokenizer."""
    return make_phi3_model(tmp_path_factory.mktemp("gguf") / "Phi-3-tiny", "longrope")


@pytest.fixture(scope="module")
def phi3_gguf(phi3_hf, tmp_path_factory):
    return pathlib.Path(export_gguf(phi3_hf, tmp_path_factory.mktemp("export") / "tiny.gguf",
                                    progress=False)[0])


def _logits(model, ids=IDS):
    return np.asarray(model.logits(ids), np.float32)


def test_fp16_round_trip_equals_hf_in_fp16(phi3_hf, phi3_gguf):
    """HF -> GGUF f16 (ours) -> phi3-jax equals HF -> phi3-jax in fp16: the same fp16 weights
    (round to nearest even either way), norms and factors kept in f32, so equal logits."""
    ours = phi3_jax.load(phi3_gguf, dtype="float16")
    hf = phi3_jax.load(phi3_hf, dtype="float16")
    assert ours.config == hf.config
    long_ids = [list(np.random.RandomState(0).randint(3, 500, size=300))]  # long factors
    for ids in (IDS, long_ids):
        np.testing.assert_array_equal(_logits(ours, ids), _logits(hf, ids))
    assert ours.tokenizer.chat_format.template == hf.tokenizer.chat_format.template


def test_load_onto_a_mesh(phi3_gguf):
    """A GGUF file loads straight onto a mesh, as an HF folder does."""
    sharded = phi3_jax.load(phi3_gguf, mesh="data=4,model=2")
    weight = sharded.params["model"]["layers"][0]["mlp"]["gate_up_proj"]["weight"]
    assert len(weight.sharding.device_set) == 8
    ids = IDS * 4  # one row per data shard
    np.testing.assert_allclose(np.asarray(sharded.logits(ids)),
                               np.asarray(phi3_jax.load(phi3_gguf).logits(ids)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", ["mha", "phi4mini"])
def test_round_trip_shapes(shape, tmp_path):
    """MHA, and partial rotary with a tied head (no output.weight in the file)."""
    hf_dir = make_phi3_model(tmp_path / f"Phi-3-{shape}", shape)
    path = export_gguf(hf_dir, tmp_path / "out" / "m.gguf", progress=False)[0]
    assert ("output.weight" in {t.name for t in gguf.GGUFReader(path).tensors}) == (
        shape != "phi4mini")
    ours, hf = phi3_jax.load(path, dtype="float16"), phi3_jax.load(hf_dir, dtype="float16")
    assert ours.config == hf.config
    np.testing.assert_array_equal(_logits(ours), _logits(hf))


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0"])
def test_quantized_export_loads_the_dequantized_weights(phi3_hf, file_type, tmp_path):
    """Every matrix is quantized as the gguf package quantizes it (q4_0: the head in q8_0),
    norms stay f32, and loading gives exactly gguf's dequantization of those blocks."""
    path = export_gguf(phi3_hf, tmp_path / "m.gguf", file_type=file_type, progress=False)[0]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_qkv.weight"] == file_type.upper()
    assert types["output.weight"] == "Q8_0"
    model = phi3_jax.load(path)
    hf = phi3_jax.load(phi3_hf)
    qtype = gguf.GGMLQuantizationType[file_type.upper()]
    w = np.asarray(hf.params["model"]["layers"][0]["mlp"]["down_proj"]["weight"]).T  # HF [D, F]
    expected = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)
    got = np.asarray(model.params["model"]["layers"][0]["mlp"]["down_proj"]["weight"]).T
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, w)


def test_convert_writes_a_hub_style_folder(phi3_hf, phi3_gguf, tmp_path):
    """`phi3-jax convert model.gguf OUT`: an Orbax checkpoint in the file's f16 (its default),
    with tokenizer.model and tokenizer.json that sentencepiece and tokenizers read as the
    originals, and the same logits as loading the file."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    out = tmp_path / "ckpt"
    assert cli.main(["convert", str(phi3_gguf), str(out), "--quiet"]) == 0
    meta = json.loads((out / "phi3_jax.json").read_text())
    assert meta["dtype"] == "float16" and meta["source_dtypes"] == ["F16", "F32"]
    converted = phi3_jax.load(out, dtype="float16")
    direct = phi3_jax.load(phi3_gguf, dtype="float16")
    assert converted.config == direct.config
    np.testing.assert_array_equal(_logits(converted), _logits(direct))
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == \
        [ENDOFTEXT, END]

    original = spm.SentencePieceProcessor(model_file=str(phi3_hf / "tokenizer.model"))
    rebuilt = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert [original.id_to_piece(i) for i in range(original.get_piece_size())] == \
        [rebuilt.id_to_piece(i) for i in range(rebuilt.get_piece_size())]
    assert (rebuilt.unk_id(), rebuilt.bos_id()) == (original.unk_id(), original.bos_id())
    hub = Tokenizer.from_file(str(phi3_hf / "tokenizer.json"))
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False).ids == \
            hub.encode(text, add_special_tokens=False).ids, text
        if "<|" not in text:
            assert rebuilt.encode(text) == original.encode(text), text


def test_imported_tokenizer_encodes_as_the_hub_and_sentencepiece(phi3_hf, phi3_gguf):
    """References: the `tokenizers` library on the folder's Hub tokenizer.json, and
    sentencepiece on its tokenizer.model (texts without special tokens)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    tokenizer = phi3_jax.load(phi3_gguf).tokenizer
    hub = Tokenizer.from_file(str(phi3_hf / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(phi3_hf / "tokenizer.model"))
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hub.encode(text, add_special_tokens=False).ids, text
        if "<|" not in text:
            assert ids == sp.encode(text), text
        assert tokenizer.decode(ids) == hub.decode(ids, skip_special_tokens=False), text
    chat = [{"role": "user", "content": "Hi"}]
    hf_tokenizer = phi3_jax.load(phi3_hf).tokenizer
    assert tokenizer.apply_chat_template(chat) == hf_tokenizer.apply_chat_template(chat)
    assert tokenizer.eos_id == ENDOFTEXT


@pytest.mark.parametrize("regex,pre", [(O200K, "gpt-4o"), (CL100K, "dbrx"), (None, "gpt-2")],
                         ids=["o200k", "cl100k", "gpt2"])
def test_bpe_tokenizer_round_trip(regex, pre, tmp_path):
    """Phi-4 family: the BPE vocabulary, merges and pre-tokenizer survive export and import
    (ids equal the `tokenizers` library's on the original tokenizer.json)."""
    from tokenizers import Tokenizer

    hf_dir = make_phi4_model(tmp_path / "phi4", regex, PHI4_MINI_TOKENS, PHI4_MINI_TEMPLATE,
                             **dict(num_attention_heads=4, num_key_value_heads=2))
    path = export_gguf(hf_dir, tmp_path / "out" / "m.gguf", progress=False)[0]
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == pre
    assert "phi3" not in reader.fields["general.name"].contents().lower()
    model = phi3_jax.load(path)
    hub = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    for text in [*TEXTS, "<|user|>Hi<|end|><|assistant|>", "I've been 'told' he's here."]:
        ids = model.tokenizer.encode(text)
        assert ids == hub.encode(text, add_special_tokens=False).ids, text
        assert model.tokenizer.decode(ids) == text
    assert model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        "<|user|>Hi<|end|><|assistant|>"
    end = model.tokenizer.token_id("<|end|>")
    assert end in model.generation_config["eos_token_id"]
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "<|{{ .Role }}|>{{ .Content }}<|end|>" in modelfile
    assert 'PARAMETER stop "<|end|>"' in modelfile


def test_modelfile(phi3_gguf, tmp_path):
    """Phi-3's Go template and stop tokens; Phi-4's im_start format."""
    modelfile = (phi3_gguf.parent / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny.gguf\n")
    assert "<|{{ .Role }}|>\n{{ .Content }}<|end|>\n" in modelfile
    assert 'PARAMETER stop "<|end|>"' in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile
    phi4 = make_phi4_model(tmp_path / "phi4", CL100K, PHI4_TOKENS, PHI4_TEMPLATE)
    export_gguf(phi4, tmp_path / "out" / "phi4.gguf", progress=False)
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert "<|im_start|>{{ .Role }}<|im_sep|>{{ .Content }}<|im_end|>" in text
    assert 'PARAMETER stop "<|im_end|>"' in text


def test_ollama_store(phi3_gguf, tmp_path, monkeypatch):
    """'ollama:NAME:TAG' resolves through the manifests to the weights blob."""
    store = ollama_store(tmp_path / "models", {"phi3:mini": phi3_gguf, "phi3": phi3_gguf})
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    from phi3_jax.gguf import ollama

    blob = ollama.resolve("ollama:phi3:mini")
    assert blob.startswith(str(store / "blobs" / "sha256-"))
    assert ollama.resolve("phi3") == ollama.resolve("registry.ollama.ai/library/phi3:latest")
    assert ollama.list_models(str(store)) == ["phi3:latest", "phi3:mini"]
    model = phi3_jax.load("ollama:phi3:mini", dtype="float16")
    np.testing.assert_array_equal(_logits(model),
                                  _logits(phi3_jax.load(phi3_gguf, dtype="float16")))


# ---------------------------------------------------------------- bad input
def _fails(capsys, argv, out, *needles):
    """The command exits 2 with one line naming the culprit, and leaves nothing behind."""
    parent = out.parent
    before = leftovers(parent)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    assert leftovers(parent) == before
    return err


def test_other_architecture(phi3_gguf, tmp_path, capsys):
    bad = rewrite_gguf(phi3_gguf, tmp_path / "llama.gguf", arch="llama")
    _fails(capsys, ["convert", str(bad), str(tmp_path / "out")], tmp_path / "out",
           str(bad), "'llama'")
    with pytest.raises(ValueError, match="'llama'"):
        phi3_jax.load(bad)


def test_truncated_file(phi3_gguf, tmp_path, capsys):
    data = phi3_gguf.read_bytes()
    for cut, needle in ((len(data) - 1000, "truncated: tensor"), (200, "truncated")):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        _fails(capsys, ["convert", str(bad), str(tmp_path / "out")], tmp_path / "out",
               str(bad), needle)


def test_unknown_tensor_type(phi3_gguf, tmp_path, capsys):
    bad = tmp_path / "badtype.gguf"
    bad.write_bytes(phi3_gguf.read_bytes())
    set_tensor_type(bad, "blk.1.ffn_down.weight", 99)
    _fails(capsys, ["convert", str(bad), str(tmp_path / "out")], tmp_path / "out",
           "'blk.1.ffn_down.weight'", "tensor type 99")


def test_missing_tokenizer(phi3_gguf, tmp_path, capsys):
    bad = rewrite_gguf(phi3_gguf, tmp_path / "notok.gguf", drop_prefix="tokenizer.")
    _fails(capsys, ["convert", str(bad), str(tmp_path / "out")], tmp_path / "out",
           "has no tokenizer")


def test_ollama_tag_missing(phi3_gguf, tmp_path, capsys, monkeypatch):
    store = ollama_store(tmp_path / "models", {"phi3:mini": phi3_gguf})
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    out = tmp_path / "out"
    _fails(capsys, ["convert", "ollama:phi3:medium", str(out)], out,
           "no model phi3:medium", "phi3:mini")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "nowhere"))
    _fails(capsys, ["convert", "ollama:phi3:mini", str(out)], out, "no Ollama model store")


def test_export_refuses_bad_targets(phi3_hf, phi3_gguf, tmp_path, capsys):
    """An existing file without --force, a folder without a tokenizer: nothing is written."""
    _fails(capsys, ["export", str(phi3_hf), str(phi3_gguf)], tmp_path / "never",
           "already exists")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((phi3_hf / name).read_bytes())
    out = tmp_path / "o" / "bare.gguf"
    (tmp_path / "o").mkdir()
    _fails(capsys, ["export", str(bare), str(out)], out, "has no tokenizer")
    assert not (tmp_path / "o" / "Modelfile").exists()
