"""GGUF against llama.cpp's own code, run for real: its converter (`convert_hf_to_gguf.py`, from
the llama-cpp-python source distribution) makes the files phi3-jax imports, and its runtime
(llama-cpp-python, built from source) runs the files phi3-jax exports.

Needs `llama_cpp` and the converter (LLAMA_CPP_CONVERTER, default .cache/llama.cpp/
convert_hf_to_gguf.py); `bash .ci/gguf` installs both. Without them the tests skip, except under
PHI3_JAX_REQUIRE_LLAMA_CPP=1 (set by CI), where they fail: the reference is never dropped silently.

Tolerances, from the numerics:

- Import, f16: llama.cpp's converter rounds the HF float32 weights to f16 as torch does (to
  nearest even), norms and rope factors stay f32, so phi3-jax in float16 gives bit-identical logits
  from the GGUF file and from the HF folder. Asserted exactly.
- Import, q8_0: the reference is the HF folder rebuilt from the `gguf` package's dequantization of
  the file's tensors; phi3-jax must load exactly those weights, so logits equal exactly (fp32).
- Export, f16: llama.cpp runs the file's f16 weights (the same ones phi3-jax loads) with f32
  accumulation, but rounds to f16 at every matmul input, in the K/V cache, and the query and
  attention probabilities before their products. phi3-jax loaded in float16 rounds at all those
  places and more, with the same f32 accumulation, so its deviation from phi3-jax in float32,
  d16 = max |logits_fp16 - logits_fp32|, is the size of error that f16 compute causes in this
  model. The two runs round independently, so their errors may point apart: the bound is
  |llama.cpp - phi3-jax fp32| <= 2 d16. (Measured: llama.cpp's error is 0.4-1.0 d16.)
- Export, q8_0 / q4_0: for these weight types llama.cpp's CPU kernels also quantize each
  activation row to q8_0 (blocks of 32 sharing one scale, max / 127) before the product: an error
  per element of up to max / 254, with a root mean square of max / (127 sqrt 12). A block of 32
  roughly Gaussian values has max / rms ~ sqrt(2 ln 32) = 2.6, so each quantized product adds about
  2.6 / 440 = 0.6% relative RMS noise; there are 4 per layer plus the head. Added linearly (the
  worst case), the relative RMS error of the logits is at most (4 L + 1) x 0.6%, 5.3% for L = 2.
  (Measured: 2-3.3%.) A wrong weight layout gives ~100%.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from gguf_fixtures import TEXTS, make_phi3_model

import phi3_jax
from phi3_jax.gguf import convert_gguf, export_gguf

REQUIRED = os.environ.get("PHI3_JAX_REQUIRE_LLAMA_CPP") == "1"
ROOT = pathlib.Path(__file__).resolve().parent.parent
CONVERTER = os.environ.get("LLAMA_CPP_CONVERTER",
                           str(ROOT / ".cache" / "llama.cpp" / "convert_hf_to_gguf.py"))
SHAPES = ("mha", "gqa", "longrope", "phi4mini")
LAYERS = 2  # conftest.TINY


def _missing(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"{reason}, and PHI3_JAX_REQUIRE_LLAMA_CPP=1 requires it (bash .ci/gguf)")
    pytest.skip(f"{reason}; `bash .ci/gguf` installs llama.cpp's reference")


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        _missing("llama-cpp-python is not installed")
    return llama_cpp


@pytest.fixture(scope="module")
def converter():
    if not os.path.isfile(CONVERTER):
        _missing(f"llama.cpp's converter is not at {CONVERTER} (LLAMA_CPP_CONVERTER)")
    return CONVERTER


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("llamacpp")


@pytest.fixture(scope="module")
def hf_models(workdir):
    """Random checkpoints of each shape. Named like the Hub's: llama.cpp applies Phi-3's
    whitespace rule after special tokens to models whose general.name says Phi-3."""
    return {shape: make_phi3_model(workdir / f"Phi-3-{shape}", shape) for shape in SHAPES}


@pytest.fixture(scope="module")
def converted(converter, hf_models, workdir):
    """converted(shape, outtype) -> the GGUF file llama.cpp's converter writes."""
    cache = {}

    def convert(shape: str, outtype: str) -> pathlib.Path:
        if (shape, outtype) not in cache:
            out = workdir / f"llamacpp-{shape}-{outtype}.gguf"
            hf = hf_models[shape]
            result = subprocess.run(
                [sys.executable, converter, str(hf), "--outfile", str(out), "--outtype",
                 outtype, "--model-name", hf.name], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr[-3000:]
            cache[shape, outtype] = out
        return cache[shape, outtype]
    return convert


def _logits(model, ids):
    return np.asarray(model.logits([ids]), np.float32)[0]


def _prompts(config):
    rng = np.random.RandomState(1)
    prompts = [rng.randint(3, 500, size=40).tolist()]
    if config.rope_scaling is not None:  # past original_max: the long factors
        prompts.append(rng.randint(3, 500, size=300).tolist())
    return prompts


def _same_file(ours: pathlib.Path, theirs: pathlib.Path) -> None:
    """Our export of a folder is the converter's file: the same keys and values (but the name
    and size label, which the converter guesses) and the same tensors, byte for byte."""
    import gguf

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    skip = {"general.name", "general.size_label", "GGUF.kv_count"}
    keys_a = {k: f.contents() for k, f in a.fields.items() if k not in skip}
    keys_b = {k: f.contents() for k, f in b.fields.items() if k not in skip}
    assert keys_a.keys() == keys_b.keys()
    for key in keys_a:
        assert keys_a[key] == keys_b[key], key
    tensors_b = {t.name: t for t in b.tensors}
    assert sorted(t.name for t in a.tensors) == sorted(tensors_b)
    for t in a.tensors:
        assert t.tensor_type == tensors_b[t.name].tensor_type, t.name
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(tensors_b[t.name].data),
                                      err_msg=t.name)


# ---------------------------------------------------------------- import
@pytest.mark.parametrize("shape", SHAPES)
def test_import_converter_f16(shape, converted, hf_models, tmp_path):
    path = converted(shape, "f16")
    ours = phi3_jax.load(path, dtype="float16")
    hf = phi3_jax.load(hf_models[shape], dtype="float16")
    assert ours.config == hf.config
    for ids in _prompts(hf.config):
        np.testing.assert_array_equal(_logits(ours, ids), _logits(hf, ids))
    _same_file(pathlib.Path(export_gguf(hf_models[shape], tmp_path / "ours.gguf",
                                        progress=False, modelfile=False)[0]), path)
    # And back: GGUF -> Orbax -> GGUF gives the converter's file again.
    convert_gguf(path, tmp_path / "orbax", progress=False)
    _same_file(pathlib.Path(export_gguf(tmp_path / "orbax", tmp_path / "back.gguf",
                                        progress=False, modelfile=False)[0]), path)


def _dequantized_folder(path: pathlib.Path, source: pathlib.Path, out: pathlib.Path):
    """The HF folder of a GGUF file's tensors as the gguf package dequantizes them."""
    import gguf
    from safetensors.numpy import save_file

    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
             "output": "lm_head", "attn_norm": "input_layernorm",
             "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.gate_up_proj",
             "ffn_down": "mlp.down_proj"}
    tensors = {}
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("rope_factors"):
            continue
        parts = t.name.split(".")
        hf = (f"model.layers.{parts[1]}.{names[parts[2]]}.weight" if parts[0] == "blk"
              else f"{names[parts[0]]}.weight")
        tensors[hf] = np.ascontiguousarray(
            gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), np.float32)
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(source / "config.json", out / "config.json")
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_import_converter_q8_0(shape, converted, hf_models, tmp_path):
    path = converted(shape, "q8_0")
    ours = phi3_jax.load(path)
    reference = phi3_jax.load(_dequantized_folder(path, hf_models[shape], tmp_path / "ref"))
    for ids in _prompts(ours.config):
        np.testing.assert_array_equal(_logits(ours, ids), _logits(reference, ids))
    _same_file(pathlib.Path(export_gguf(hf_models[shape], tmp_path / "ours.gguf",
                                        file_type="q8_0", progress=False,
                                        modelfile=False)[0]), path)


def test_import_tokenizer(converted, hf_models, llama_cpp):
    """The tokenizer imported from the converter's file encodes as the folder's Hub
    tokenizer.json (the `tokenizers` library), as sentencepiece on its tokenizer.model, and as
    llama.cpp's tokenizer on the same file."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    path, folder = converted("mha", "f16"), hf_models["mha"]
    tokenizer = phi3_jax.load(path).tokenizer
    hub = Tokenizer.from_file(str(folder / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hub.encode(text, add_special_tokens=False).ids, text
        assert ids == llm.tokenize(text.encode(), add_bos=False, special=True), text
        if "<|" not in text:
            assert ids == sp.encode(text), text
    assert tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]) == \
        "<|user|>\nHi<|end|>\n<|assistant|>\n"


# ---------------------------------------------------------------- export
def _llama(llama_cpp, path, n_ctx):
    return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=512,
                           n_threads=2, verbose=False)


def _llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], np.float32)


def _llama_greedy(llm, ids, steps):
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_export_f16_runs_in_llamacpp(shape, hf_models, llama_cpp, tmp_path):
    path = export_gguf(hf_models[shape], tmp_path / "m.gguf", progress=False)[0]
    model = phi3_jax.load(path)
    model16 = phi3_jax.load(path, dtype="float16")
    for ids in _prompts(model.config):
        # llama.cpp picks the LongRoPE factors by its context size (a multiple of 256), so
        # the context is just long enough for the prompt, as phi3-jax picks by the positions.
        llm = _llama(llama_cpp, path, n_ctx=256 * -(-(len(ids) + 32) // 256))
        ref = _logits(model, ids)
        d16 = np.abs(_logits(model16, ids) - ref).max()
        err = np.abs(_llama_logits(llm, ids) - ref).max()
        assert err <= 2 * d16, (err, d16)
        # Greedy decoding, 32 steps: phi3-jax with no stop token, as the loop above has none.
        free = phi3_jax.api.Phi3(dataclasses.replace(model.config, eos_token_id=()),
                                 model.graphdef, model.params, tokenizer=model.tokenizer)
        ours = free.generate([ids], max_new_tokens=32)[0].token_ids
        assert _llama_greedy(llm, ids, 32) == list(ours)
    llm = _llama(llama_cpp, path, n_ctx=256)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            model.tokenizer.encode(text), text


@pytest.mark.parametrize("file_type", ["q8_0", "q4_0"])
def test_export_quantized_runs_in_llamacpp(file_type, hf_models, llama_cpp, tmp_path):
    for shape in ("gqa", "phi4mini"):
        path = export_gguf(hf_models[shape], tmp_path / f"{shape}.gguf", file_type=file_type,
                           progress=False, modelfile=False)[0]
        model = phi3_jax.load(path)  # the same dequantized weights, in float32
        ids = _prompts(model.config)[0]
        ref = _logits(model, ids)
        diff = _llama_logits(_llama(llama_cpp, path, 256), ids) - ref
        relative_rms = np.sqrt((diff**2).mean() / (ref**2).mean())
        bound = (4 * LAYERS + 1) * np.sqrt(2 * np.log(32)) / (127 * np.sqrt(12))
        assert relative_rms <= bound, (relative_rms, bound)



@pytest.mark.parametrize("pre", ["gpt-4o", "dbrx"])
def test_export_bpe_tokenizer_runs_in_llamacpp(pre, llama_cpp, tmp_path):
    """Phi-4 family vocabularies: llama.cpp tokenizes our export's BPE (merges, pre-tokenizer
    named by its regex: o200k's gpt-4o, cl100k's dbrx) as the `tokenizers` library does the
    folder's tokenizer.json, and as phi3-jax does."""
    from gguf_fixtures import make_phi4_model
    from tokenizers import Tokenizer

    from phi3_jax.gguf.vocab import CL100K, O200K

    tokens = ("<|endoftext|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>")
    template = ("{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    folder = make_phi4_model(tmp_path / "Phi-4-mini-tiny", O200K if pre == "gpt-4o" else CL100K,
                             tokens, template, num_attention_heads=4, num_key_value_heads=2)
    path = export_gguf(folder, tmp_path / "out" / "m.gguf", progress=False)[0]
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    assert llm.metadata["tokenizer.ggml.pre"] == pre
    hub = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer = phi3_jax.load(path).tokenizer
    for text in [*TEXTS, "<|user|>Hi<|end|><|assistant|>", "I've been 'told' he's HERE, OK?"]:
        ids = hub.encode(text, add_special_tokens=False).ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
        assert tokenizer.encode(text) == ids, text
